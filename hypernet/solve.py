"""Least squares across all edits, and its backward.

For one edited module with keys K (n x d_k) and desired value shifts D (n x d_v):

    S = argmin ||K S - D||^2 + lam ||S||^2 = (K^T K + lam I)^-1 K^T D      (d_k x d_k form)
                                           = K^T (K K^T + lam I)^-1 D      (n x n form)

The n x n form is used when n < d_k. Both are solved with a Cholesky factor in float32
(or float64), and the factor is kept for the backward. With A = K^T K + lam I, a loss L
and G = dL/dS:

    M = A^-1 G,    dL/dD = K M,    dL/dlog(lam) = -lam <M, S>.

A key prior C (d_k x d_k, e.g. the second moment of the module's keys on unrelated text)
adds a preservation term, as in MEMIT: S = argmin ||K S - D||^2 + lam ||S||^2 + mu ||C^1/2 S||^2,
so A = K^T K + lam I + mu C (d_k x d_k form only) and dL/dlog(mu) = -mu <M, C S>.

In the n x n form, with B = K K^T + lam I:  K M = B^-1 K G  and
M = (G - K^T B^-1 K G) / lam  (Woodbury), so A is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factor:
    """A Cholesky factor of A (d_k x d_k) or B (n x n), with what the backward needs."""

    chol: torch.Tensor
    keys: torch.Tensor
    lam: torch.Tensor
    small: bool  # True: n x n form (B = K K^T + lam I)
    prior: torch.Tensor | None = None  # C, when A carries mu C
    mu: torch.Tensor | None = None


def factorize(keys: torch.Tensor, lam: torch.Tensor, dtype=torch.float32,
              form: str = "auto", prior: torch.Tensor | None = None, mu=None) -> Factor:
    """Cholesky factor for the solve; `form` is "auto", "keys" (d_k x d_k) or "tokens" (n x n).
    With a key `prior` C (d_k x d_k) and its weight `mu`, A = K^T K + lam I + mu C."""
    if keys.ndim != 2:
        raise ValueError(f"keys must be n x d_k, got shape {tuple(keys.shape)}")
    n, d_k = keys.shape
    if form not in ("auto", "keys", "tokens"):
        raise ValueError(f"form must be 'auto', 'keys' or 'tokens', got {form!r}")
    if prior is not None:
        if form == "tokens":
            raise ValueError("a key prior needs the d_k x d_k form (form='keys' or 'auto')")
        if tuple(prior.shape) != (d_k, d_k) or mu is None:
            raise ValueError(f"the key prior must be d_k x d_k = {d_k} x {d_k} with a weight mu, "
                             f"got shape {tuple(prior.shape)}, mu={mu}")
    small = prior is None and (n < d_k if form == "auto" else form == "tokens")
    k = keys.to(dtype)
    lam = torch.as_tensor(lam, dtype=dtype, device=keys.device).reshape(())
    gram = k @ k.T if small else k.T @ k
    gram.diagonal().add_(lam)
    if prior is not None:
        prior = prior.to(dtype)
        mu = torch.as_tensor(mu, dtype=dtype, device=keys.device).reshape(())
        gram = gram + mu * prior
    chol, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
        raise FloatingPointError(
            f"least-squares matrix is not positive definite (lambda={lam.item():.3g}); "
            "keys contain NaN/Inf or lambda is too small for this precision (try float64)")
    return Factor(chol, k, lam, small, prior, mu)


def solve(factor: Factor, values: torch.Tensor) -> torch.Tensor:
    """S (d_k x d_v) from desired value shifts D (n x d_v)."""
    d = values.to(factor.keys.dtype)
    if factor.small:
        return factor.keys.T @ torch.cholesky_solve(d, factor.chol)
    return torch.cholesky_solve(factor.keys.T @ d, factor.chol)


def solve_backward(factor: Factor, shift: torch.Tensor, grad: torch.Tensor):
    """(dL/dD, dL/dlog lam, dL/dlog mu) from G = dL/dS and S, reusing the factor; the last
    is None without a key prior."""
    k, g = factor.keys, grad.to(factor.keys.dtype)
    if factor.small:
        kg = torch.cholesky_solve(k @ g, factor.chol)  # B^-1 K G = K A^-1 G
        m = (g - k.T @ kg) / factor.lam
        grad_values = kg
    else:
        m = torch.cholesky_solve(g, factor.chol)
        grad_values = k @ m
    shift = shift.to(m.dtype)
    grad_log_lam = -factor.lam * (m * shift).sum()
    grad_log_mu = None
    if factor.prior is not None:
        grad_log_mu = -factor.mu * (m * (factor.prior @ shift)).sum()
    return grad_values, grad_log_lam, grad_log_mu


def solve_gram(gram: torch.Tensor, rhs: torch.Tensor, lam, dtype=torch.float32,
               prior: torch.Tensor | None = None, mu=None) -> torch.Tensor:
    """S = (G + lam I + mu C)^-1 R from sufficient statistics G = K^T K and R = K^T D
    (summed over any number of batches: the joint solve of all their rows)."""
    a = gram.to(dtype).clone()
    a.diagonal().add_(torch.as_tensor(lam, dtype=dtype, device=a.device).reshape(()))
    if prior is not None:
        a = a + torch.as_tensor(mu, dtype=dtype, device=a.device).reshape(()) * prior.to(dtype)
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0:
        raise FloatingPointError("least-squares matrix is not positive definite; statistics "
                                 "contain NaN/Inf or lambda is too small (try float64)")
    return torch.cholesky_solve(rhs.to(dtype), chol)


class LeastSquares(torch.autograd.Function):
    """S = LeastSquares.apply(K, D, log_lam, C, log_mu, dtype, form): differentiable in D,
    log_lam and log_mu (keys and the prior C are data, not parameters; C and log_mu may be
    None), with the analytic backward above."""

    @staticmethod
    def forward(ctx, keys, values, log_lam, prior=None, log_mu=None, dtype=torch.float32,
                form="auto"):
        mu = None if log_mu is None else log_mu.exp()
        factor = factorize(keys, log_lam.exp(), dtype, form, prior, mu)
        shift = solve(factor, values)
        ctx.factor, ctx.out_dtype = factor, values.dtype
        ctx.shapes = (log_lam.shape, None if log_mu is None else log_mu.shape)
        ctx.save_for_backward(shift)
        return shift.to(values.dtype)

    @staticmethod
    def backward(ctx, grad):
        (shift,) = ctx.saved_tensors
        grad_values, grad_log_lam, grad_log_mu = solve_backward(ctx.factor, shift, grad)
        lam_shape, mu_shape = ctx.shapes
        if grad_log_mu is not None:
            grad_log_mu = grad_log_mu.reshape(mu_shape).to(ctx.out_dtype)
        return (None, grad_values.to(ctx.out_dtype),
                grad_log_lam.reshape(lam_shape).to(ctx.out_dtype), None, grad_log_mu, None, None)


def least_squares(keys, values, log_lam, dtype=torch.float32, form="auto", prior=None,
                  log_mu=None) -> torch.Tensor:
    return LeastSquares.apply(keys, values, log_lam, prior, log_mu, dtype, form)


def diagnostics(keys, values, lam, prior=None, mu=None) -> dict[str, float]:
    """How well the joint solve fits, for keys K (n x d_k) and desired shifts D (n x d_v):
    the relative residual ||K S - D|| / ||D||; tr(H) / n with H = K A^-1 K^T (the mean
    leverage: 1 when every row is fitted exactly, near 0 when the ridge and the prior
    dominate); and the relative difference of S solved in float32 against float64."""
    factor = factorize(keys, lam, torch.float64, "keys", prior=prior, mu=mu)  # A, d_k x d_k
    exact = solve(factor, values)
    approx = solve(factorize(keys, lam, torch.float32, prior=prior, mu=mu), values)
    k, d = factor.keys, values.double()
    leverage = torch.cholesky_solve(k.T @ k, factor.chol).diagonal().sum() / k.shape[0]
    return {"residual": ((k @ exact - d).norm() / d.norm().clamp_min(1e-30)).item(),
            "leverage": leverage.item(),
            "fp32_vs_fp64": ((approx.double() - exact).norm()
                             / exact.norm().clamp_min(1e-30)).item()}
