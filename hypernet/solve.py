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

import warnings
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


def in_float64_if_needed(build, keys: list[torch.Tensor], dtype, fallback: bool = True):
    """`build(dtype)`: a Cholesky solve of `keys` (or of their statistics), which must be
    finite. Its matrix is positive definite in exact arithmetic, so where float32's Cholesky
    still fails (thousands of rows against a small lambda: too ill-conditioned for float32)
    it is done once more in float64, with a warning (`fallback=False`: the error instead)."""
    if not all(bool(torch.isfinite(k).all()) for k in keys):
        raise FloatingPointError("keys contain NaN or Inf; nothing to solve")
    try:
        return build(dtype)
    except FloatingPointError as error:
        if not fallback or dtype == torch.float64:
            raise
        warnings.warn(f"{error} (inputs of shape {tuple(keys[0].shape)}); solved in float64",
                      stacklevel=3)
    return build(torch.float64)


def factorize(keys: torch.Tensor, lam: torch.Tensor, dtype=torch.float32,
              form: str = "auto", prior: torch.Tensor | None = None, mu=None,
              fallback: bool = True) -> Factor:
    """Cholesky factor for the solve; `form` is "auto", "keys" (d_k x d_k) or "tokens" (n x n).
    With a key `prior` C (d_k x d_k) and its weight `mu`, A = K^T K + lam I + mu C. Where
    `dtype` is too coarse for the matrix, float64 (`in_float64_if_needed`)."""
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
    return in_float64_if_needed(lambda dt: _factorize(keys, lam, dt, small, prior, mu),
                                [keys], dtype, fallback)


def _factorize(keys, lam, dtype, small: bool, prior, mu) -> Factor:
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
            f"least-squares matrix is not positive definite in {dtype} "
            f"(lambda={lam.item():.3g}): too ill-conditioned for this precision")
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
    (summed over any number of batches: the joint solve of all their rows); float64 where
    `dtype` is too coarse (`in_float64_if_needed`)."""
    def build(dtype):
        a = gram.to(dtype).clone()
        a.diagonal().add_(torch.as_tensor(lam, dtype=dtype, device=a.device).reshape(()))
        if prior is not None:
            a = a + torch.as_tensor(mu, dtype=dtype, device=a.device).reshape(()) * \
                prior.to(dtype)
        chol, info = torch.linalg.cholesky_ex(a)
        if info.item() != 0:
            raise FloatingPointError(f"least-squares matrix is not positive definite in "
                                     f"{dtype}: too ill-conditioned for this precision")
        return torch.cholesky_solve(rhs.to(dtype), chol)

    return in_float64_if_needed(build, [gram, rhs], dtype)


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
    approx = _float32_or_none(lambda: solve(factorize(
        keys, lam, torch.float32, prior=prior, mu=mu, fallback=False), values))
    k, d = factor.keys, values.double()
    leverage = torch.cholesky_solve(k.T @ k, factor.chol).diagonal().sum() / k.shape[0]
    return {"residual": ((k @ exact - d).norm() / d.norm().clamp_min(1e-30)).item(),
            "leverage": leverage.item(),
            "fp32_vs_fp64": float("inf") if approx is None else
            ((approx.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()}


def _float32_or_none(solve_fn):
    """The float32 solve of a diagnostic, None where float32's Cholesky fails."""
    try:
        return solve_fn()
    except FloatingPointError:
        return None


# ------------------------------------------------------------------ coupled across modules
#
# Modules whose outputs add into the same stream (the down_proj of several blocks all write
# the residual) can share one solve: find S_1..S_L with
#
#     min ||sum_l K_l S_l - D||^2 + sum_l tr(S_l^T R_l S_l),   R_l = lam_l I + mu_l C_l,
#
# D = sum_l D_l the value shift all modules together were asked for (rows are the same
# tokens at every module). Setting the gradient to zero gives S_l = R_l^-1 K_l^T a, with the
# residual a = D - sum_l K_l S_l = B^-1 D and B = I + sum_l K_l R_l^-1 K_l^T (n x n). One
# module alone gives the ridge solve above (Woodbury). The fit has rank up to L d_k instead
# of d_k: n rows beyond one module's d_k can still be met. Backward, with G_l = dL/dS_l:
#
#     dL/dD = g = B^-1 sum_l K_l R_l^-1 G_l,      M_l = R_l^-1 (G_l - K_l^T g),
#     dL/dlog(lam_l) = -lam_l <M_l, S_l>,          dL/dlog(mu_l) = -mu_l <M_l, C_l S_l>.


@dataclass
class CoupledFactor:
    """What the coupled solve and its backward reuse: per module the Cholesky factor of R_l
    and W_l = R_l^-1 K_l^T (d_k x n), and the Cholesky factor of B (n x n)."""

    chol_b: torch.Tensor
    chol_r: list[torch.Tensor]
    proj: list[torch.Tensor]  # W_l
    keys: list[torch.Tensor]
    lams: list[torch.Tensor]
    priors: list[torch.Tensor | None]
    mus: list[torch.Tensor | None]


def coupled_factorize(keys: list[torch.Tensor], lams, dtype=torch.float32, priors=None,
                      mus=None, fallback: bool = True) -> CoupledFactor:
    """Factors of the coupled solve over modules with keys K_l (n x d_k_l, the same n rows),
    ridge weights lam_l and optional key priors C_l with weights mu_l; where `dtype` is too
    coarse for B (thousands of rows), float64 (`in_float64_if_needed`)."""
    if not keys or any(k.ndim != 2 or k.shape[0] != keys[0].shape[0] for k in keys):
        raise ValueError(f"coupled keys must be n x d_k with the same n rows, got shapes "
                         f"{[tuple(k.shape) for k in keys]}")
    return in_float64_if_needed(lambda dt: _coupled_factorize(keys, lams, dt, priors, mus),
                                keys, dtype, fallback)


def ridge(d: int, lam, prior, mu, dtype, device):
    """(R = lam I + mu C, d x d; lam; mu) as tensors of `dtype`: a module's regularizer in
    the coupled solve (mu stays None without a key prior C)."""
    lam = torch.as_tensor(lam, dtype=dtype, device=device).reshape(())
    r = torch.diag(lam.expand(d))
    if prior is not None:
        mu = torch.as_tensor(mu, dtype=dtype, device=device).reshape(())
        r = r + mu * prior.to(dtype)
    return r, lam, mu


def _coupled_factorize(keys, lams, dtype, priors, mus) -> CoupledFactor:
    priors = list(priors) if priors is not None else [None] * len(keys)
    mus = list(mus) if mus is not None else [None] * len(keys)
    n, device = keys[0].shape[0], keys[0].device
    b = torch.eye(n, dtype=dtype, device=device)
    chol_r, proj, ks, lam_t, mu_t = [], [], [], [], []
    for k, lam, prior, mu in zip(keys, lams, priors, mus):
        k = k.to(dtype)
        r, lam, mu = ridge(k.shape[1], lam, prior, mu, dtype, device)
        chol, info = torch.linalg.cholesky_ex(r)
        if info.item() != 0:
            raise FloatingPointError(f"ridge matrix lam I + mu C is not positive definite "
                                     f"(lambda={lam.item():.3g})")
        w = torch.cholesky_solve(k.T.contiguous(), chol)
        b += k @ w
        chol_r.append(chol), proj.append(w), ks.append(k), lam_t.append(lam), mu_t.append(mu)
    chol_b, info = torch.linalg.cholesky_ex(b)
    if info.item() != 0:
        raise FloatingPointError(f"coupled least-squares matrix is not positive definite in "
                                 f"{dtype}: too ill-conditioned for this precision")
    return CoupledFactor(chol_b, chol_r, proj, ks, lam_t, priors, mu_t)


def coupled_extend(factor: CoupledFactor, keys: list[torch.Tensor]) -> CoupledFactor:
    """`factor` with m more rows (their keys K'_l, m x d_k_l) and the same R_l: only the new
    rows' W'_l = R_l^-1 K'_l^T, their blocks of B and the Cholesky factor's new rows,
        B = [[B11, B12], [B12^T, B22]] = [[L11, 0], [L21, L22]] [[L11, 0], [L21, L22]]^T,
        L21 = (L11^-1 B12)^T,   L22 = chol(B22 - L21 L21^T),
    so rows added in turn cost O(m n d_k) per module, not a refactorization of all n + m
    (equal to `coupled_factorize` of all rows to float tolerance, which it falls back to where
    `dtype` is too coarse for the extension)."""
    dtype, chol = factor.chol_b.dtype, factor.chol_b
    new = [k.to(dtype) for k in keys]
    if len(new) != len(factor.keys) or any(
            k.ndim != 2 or k.shape[0] != new[0].shape[0] or k.shape[1] != old.shape[1]
            for k, old in zip(new, factor.keys)):
        raise ValueError(f"coupled_extend: keys must be m x d_k for each of the factor's "
                         f"{len(factor.keys)} modules, got {[tuple(k.shape) for k in keys]}")
    proj = [torch.cholesky_solve(k.T.contiguous(), r) for k, r in zip(new, factor.chol_r)]
    b12 = sum(k @ w for k, w in zip(factor.keys, proj))
    b22 = torch.eye(new[0].shape[0], dtype=dtype, device=chol.device) + sum(
        k @ w for k, w in zip(new, proj))
    l21 = torch.linalg.solve_triangular(chol, b12, upper=False).T
    l22, info = torch.linalg.cholesky_ex(b22 - l21 @ l21.T)
    if info.item() != 0:  # too coarse for all the rows: factorize them all (float64 if need be)
        return coupled_factorize([torch.cat([k, k2]) for k, k2 in zip(factor.keys, new)],
                                 factor.lams, dtype, factor.priors, factor.mus)
    n, m = chol.shape[0], new[0].shape[0]
    full = chol.new_zeros(n + m, n + m)
    full[:n, :n], full[n:, :n], full[n:, n:] = chol, l21, l22
    return CoupledFactor(full, factor.chol_r, [torch.cat([w, w2], 1) for w, w2 in
                                               zip(factor.proj, proj)],
                         [torch.cat([k, k2]) for k, k2 in zip(factor.keys, new)], factor.lams,
                         factor.priors, factor.mus)


# ------------------------------------------------------------------ coupled, rows in turn
#
# Lifelong editing adds rows to one coupled solve batch by batch. With K = [K_1 .. K_L]
# (n x p, p = sum_l d_k_l), R = blockdiag(R_l) and A = K^T K + R, the solve is S = A^-1 K^T D
# (Woodbury of the form above), and m new rows K' (m x p), D' change it by recursive least
# squares, without the n earlier rows' D:
#
#     S' = S + A'^-1 K'^T (D' - K' S),
#     A'^-1 K'^T = W B'^-1 E                        (row space, E: B's new rows of I)
#                = P K'^T (I + K' P K'^T)^-1         (key space, P = A^-1, p x p).
#
# While the rows number at most p, the row-space factor is extended (`coupled_extend`), and
# B'^-1 E = L^-T [0; L22^-1] costs O(m n (n + p)); beyond p rows the editor keeps P (float64)
# instead, updated by Woodbury, P' = P - P K'^T (I + K' P K'^T)^-1 K' P, in O(m p^2): from
# there on a batch costs the same however many rows were edited before it.


@dataclass
class CoupledRunning:
    """A coupled solve kept across batches of rows: the S_l of all rows so far, and the row
    space factor (`factor`, while rows <= p) or the key space inverse P (`inverse`)."""

    shifts: list[torch.Tensor]
    rows: int
    lams: list
    priors: list | None
    mus: list | None
    factor: CoupledFactor | None = None
    inverse: torch.Tensor | None = None


def coupled_inverse(keys: list[torch.Tensor], lams, priors=None, mus=None) -> torch.Tensor:
    """P = (K^T K + R)^-1 (p x p, float64) for keys K_l (n x d_k_l), K = [K_1 .. K_L] and
    R = blockdiag(lam_l I + mu_l C_l)."""
    k = torch.cat(keys, 1).double()
    a = k.T @ k
    priors, mus = priors or [None] * len(keys), mus or [None] * len(keys)
    start = 0
    for key, lam, prior, mu in zip(keys, lams, priors, mus):
        d = key.shape[1]
        a[start:start + d, start:start + d] += ridge(d, lam, prior, mu, a.dtype, a.device)[0]
        start += d
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0:
        raise FloatingPointError("coupled key-space matrix K^T K + R is not positive definite")
    return torch.cholesky_inverse(chol)


def coupled_start(keys: list[torch.Tensor], values: torch.Tensor, lams, dtype=torch.float32,
                  priors=None, mus=None) -> CoupledRunning:
    """The coupled solve of n rows (keys K_l, summed shifts D), kept for `coupled_add`: in
    row space (`coupled_factorize`, `dtype`) up to p rows, else with the key-space P."""
    n, sizes = keys[0].shape[0], [k.shape[1] for k in keys]
    if n <= sum(sizes):
        factor = coupled_factorize(keys, lams, dtype, priors, mus)
        return CoupledRunning(coupled_solve(factor, values), n, lams, priors, mus, factor)
    inverse = coupled_inverse(keys, lams, priors, mus)
    shifts = inverse @ (torch.cat(keys, 1).double().T @ values.double())
    return CoupledRunning(list(shifts.split(sizes)), n, lams, priors, mus, inverse=inverse)


def coupled_add(run: CoupledRunning, keys: list[torch.Tensor],
                values: torch.Tensor) -> tuple[CoupledRunning, list[torch.Tensor]]:
    """(the solve with m more rows, [S'_l - S_l]) from their keys K'_l (m x d_k_l) and summed
    shifts D' (m x d_v): recursive least squares (above); equal to `coupled_start` of all
    rows to float tolerance. In key space P is updated in place: `run` is not to be used
    again."""
    sizes, m = [s.shape[0] for s in run.shifts], values.shape[0]
    if len(keys) != len(sizes) or any(k.ndim != 2 or k.shape != (m, d)
                                      for k, d in zip(keys, sizes)):
        raise ValueError(f"coupled_add: keys must be {m} x d_k for the solve's modules "
                         f"{sizes}, got {[tuple(k.shape) for k in keys]}")
    rows, factor, inverse = run.rows + m, None, None
    if run.inverse is None and rows <= sum(sizes):
        factor = coupled_extend(run.factor, keys)
        dtype, chol = factor.chol_b.dtype, factor.chol_b
        z = torch.linalg.solve_triangular(chol[run.rows:, run.rows:],
                                          torch.eye(m, dtype=dtype, device=chol.device),
                                          upper=False)
        z = torch.linalg.solve_triangular(chol.T, torch.cat([z.new_zeros(run.rows, m), z]),
                                          upper=True)
        gain = torch.cat([w @ z for w in factor.proj])  # A'^-1 K'^T, p x m
    elif run.inverse is None:  # the rows outgrow p: P of all rows, once
        inverse = coupled_inverse([torch.cat([a, b.to(a)]) for a, b in zip(run.factor.keys,
                                                                          keys)],
                                  run.lams, run.priors, run.mus)
        gain = inverse @ torch.cat(keys, 1).double().T
    else:
        k = torch.cat(keys, 1).to(run.inverse)
        u = run.inverse @ k.T
        c = torch.linalg.cholesky(torch.eye(m, dtype=u.dtype, device=u.device) + k @ u)
        gain = torch.cholesky_solve(u.T, c).T  # u (I + K' P K'^T)^-1
        inverse = run.inverse
    shifts = [s.to(gain) for s in run.shifts]
    residual = values.to(gain) - sum(k.to(gain) @ s for k, s in zip(keys, shifts))
    delta = list((gain @ residual).split(sizes))
    if run.inverse is not None:  # last, and in place (680 MB at p = 9,216): `run` is used up
        inverse.addmm_(gain, u.T, alpha=-1)
    return CoupledRunning([s + d for s, d in zip(shifts, delta)], rows, run.lams, run.priors,
                          run.mus, factor, inverse), delta


def coupled_solve(factor: CoupledFactor, values: torch.Tensor) -> list[torch.Tensor]:
    """[S_l] (d_k x d_v each) from the summed desired value shifts D (n x d_v)."""
    a = torch.cholesky_solve(values.to(factor.chol_b.dtype), factor.chol_b)
    return [w @ a for w in factor.proj]


def coupled_backward(factor: CoupledFactor, shifts, grads):
    """(dL/dD, [dL/dlog lam_l], [dL/dlog mu_l or None]) from G_l = dL/dS_l and S_l."""
    grads = [g.to(factor.chol_b.dtype) for g in grads]
    g = torch.cholesky_solve(sum(w.T @ gl for w, gl in zip(factor.proj, grads)), factor.chol_b)
    d_lam, d_mu = [], []
    for k, chol, gl, s, lam, prior, mu in zip(factor.keys, factor.chol_r, grads, shifts,
                                             factor.lams, factor.priors, factor.mus):
        m = torch.cholesky_solve(gl - k.T @ g, chol)
        s = s.to(m.dtype)
        d_lam.append(-lam * (m * s).sum())
        d_mu.append(None if prior is None else -mu * (m * (prior.to(m.dtype) @ s)).sum())
    return g, d_lam, d_mu


def coupled_leverage(factor: CoupledFactor) -> float:
    """tr(H) / n with H = Q (I + Q)^-1, Q = sum_l K_l R_l^-1 K_l^T: the mean share of its
    requested shift each row gets (1: all of it)."""
    n = factor.chol_b.shape[0]
    eye = torch.eye(n, dtype=factor.chol_b.dtype, device=factor.chol_b.device)
    return (1 - torch.cholesky_solve(eye, factor.chol_b).diagonal().sum() / n).item()


def coupled_diagnostics(keys: list, values, lams, priors=None, mus=None) -> dict[str, float]:
    """`diagnostics` of the coupled solve: residual ||sum_l K_l S_l - D|| / ||D||, mean
    leverage tr(Q (I + Q)^-1) / n and float32 against float64 of the S_l."""
    exact_factor = coupled_factorize([k.double() for k in keys], lams, torch.float64, priors, mus)
    exact = coupled_solve(exact_factor, values)
    approx = _float32_or_none(lambda: coupled_solve(coupled_factorize(
        keys, lams, torch.float32, priors, mus, fallback=False), values))
    d = values.double()
    fit = sum(k.double() @ s for k, s in zip(keys, exact))
    diff = float("inf") if approx is None else \
        sum((a.double() - s).norm() ** 2 for a, s in zip(approx, exact)) ** 0.5
    return {"residual": ((fit - d).norm() / d.norm().clamp_min(1e-30)).item(),
            "leverage": coupled_leverage(exact_factor),
            "fp32_vs_fp64": float(diff / sum(s.norm() ** 2 for s in exact) ** 0.5)}
