"""Least squares across all edits, and its backward.

For one edited module with keys K (n x d_k) and desired value shifts D (n x d_v):

    S = argmin ||K S - D||^2 + lam ||S||^2 = (K^T K + lam I)^-1 K^T D      (d_k x d_k form)
                                           = K^T (K K^T + lam I)^-1 D      (n x n form)

The n x n form is used when n < d_k. Both are solved with a Cholesky factor in float32
(or float64), and the factor is kept for the backward. With A = K^T K + lam I, a loss L
and G = dL/dS:

    M = A^-1 G,    dL/dD = K M,    dL/dlog(lam) = -lam <M, S>.

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


def factorize(keys: torch.Tensor, lam: torch.Tensor, dtype=torch.float32,
              form: str = "auto") -> Factor:
    """Cholesky factor for the solve; `form` is "auto", "keys" (d_k x d_k) or "tokens" (n x n)."""
    if keys.ndim != 2:
        raise ValueError(f"keys must be n x d_k, got shape {tuple(keys.shape)}")
    n, d_k = keys.shape
    if form not in ("auto", "keys", "tokens"):
        raise ValueError(f"form must be 'auto', 'keys' or 'tokens', got {form!r}")
    small = n < d_k if form == "auto" else form == "tokens"
    k = keys.to(dtype)
    lam = torch.as_tensor(lam, dtype=dtype, device=keys.device).reshape(())
    gram = k @ k.T if small else k.T @ k
    gram.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
        raise FloatingPointError(
            f"least-squares matrix is not positive definite (lambda={lam.item():.3g}); "
            "keys contain NaN/Inf or lambda is too small for this precision (try float64)")
    return Factor(chol, k, lam, small)


def solve(factor: Factor, values: torch.Tensor) -> torch.Tensor:
    """S (d_k x d_v) from desired value shifts D (n x d_v)."""
    d = values.to(factor.keys.dtype)
    if factor.small:
        return factor.keys.T @ torch.cholesky_solve(d, factor.chol)
    return torch.cholesky_solve(factor.keys.T @ d, factor.chol)


def solve_backward(factor: Factor, shift: torch.Tensor, grad: torch.Tensor):
    """(dL/dD, dL/dlog lam) from G = dL/dS and S, reusing the factor."""
    k, g = factor.keys, grad.to(factor.keys.dtype)
    if factor.small:
        kg = torch.cholesky_solve(k @ g, factor.chol)  # B^-1 K G = K A^-1 G
        m = (g - k.T @ kg) / factor.lam
        grad_values = kg
    else:
        m = torch.cholesky_solve(g, factor.chol)
        grad_values = k @ m
    grad_log_lam = -factor.lam * (m * shift.to(m.dtype)).sum()
    return grad_values, grad_log_lam


class LeastSquares(torch.autograd.Function):
    """S = LeastSquares.apply(K, D, log_lam, dtype, form): differentiable in D and log_lam
    (keys are data, not parameters), with the analytic backward above."""

    @staticmethod
    def forward(ctx, keys, values, log_lam, dtype=torch.float32, form="auto"):
        factor = factorize(keys, log_lam.exp(), dtype, form)
        shift = solve(factor, values)
        ctx.factor, ctx.out_dtype, ctx.lam_shape = factor, values.dtype, log_lam.shape
        ctx.save_for_backward(shift)
        return shift.to(values.dtype)

    @staticmethod
    def backward(ctx, grad):
        (shift,) = ctx.saved_tensors
        grad_values, grad_log_lam = solve_backward(ctx.factor, shift, grad)
        return (None, grad_values.to(ctx.out_dtype),
                grad_log_lam.reshape(ctx.lam_shape).to(ctx.out_dtype), None, None)


def least_squares(keys, values, log_lam, dtype=torch.float32, form="auto") -> torch.Tensor:
    return LeastSquares.apply(keys, values, log_lam, dtype, form)
