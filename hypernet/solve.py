"""The least-squares solve of an edit, and its backward: one solve for every editor.

Edited modules whose outputs add into the same stream (the down_proj of several blocks all
write the residual) share one solve; a module alone is a group of one. For a group of L
modules with keys K_l (n x d_l, the same n rows: one per target token) and the summed value
shifts the network asks for, D (n x d_v), find S_1..S_L with

    min ||sum_l K_l S_l - D||^2 + sum_l tr(S_l^T R_l S_l),     R_l = lam_l I + mu_l C_l,

C_l an optional key prior (a second moment of the module's keys on text whose outputs must
be kept, as in MEMIT). The gradient is zero at S_l = R_l^-1 K_l^T a with a = B^-1 D and

    B = I + sum_l K_l R_l^-1 K_l^T        (n x n: the "row space" form),

so one module gives the ridge solve S = (K^T K + R)^-1 K^T D. Backward, with G_l = dL/dS_l:

    dL/dD = g = B^-1 sum_l K_l R_l^-1 G_l,       M_l = R_l^-1 (G_l - K_l^T g),
    dL/dlog(lam_l) = -lam_l <M_l, S_l>,           dL/dlog(mu_l) = -mu_l <M_l, C_l S_l>.

Output-side preservation (`output_bins`): a penalty mu_o tr(S_l^T C_l S_l G) with G the
second moment of the loss gradients at the modules' outputs on text whose answers must be
kept (which output directions those answers depend on). With G = U diag(g) U^T the solve
splits by output direction: column j of S_l U solves the same problem with
mu_l -> mu_l + mu_o g_j. The directions are grouped into bins of similar g (one solve per bin,
at the bin's mean g): D U's columns of a bin are solved together, S_l = sum_b S_lb U_b^T.

Everything is float64: B's condition number grows with the rows, and a float32 Cholesky
that succeeds can still be inexact. A matrix that is not positive definite even so raises
FloatingPointError.

Rows in turn (lifelong editing). With K = [K_1 .. K_L] (n x p, p = sum_l d_l),
R = blockdiag(R_l) and A = K^T K + R, m new rows K', D' change the solve by recursive least
squares, without the earlier rows' D:

    S' = S + A'^-1 K'^T (D' - K' S),
    A'^-1 K'^T = W B'^-1 E                         (row space, W = R^-1 K^T, E: B's new rows of I)
               = P K'^T (I + K' P K'^T)^-1          (key space, P = A^-1, p x p).

While the rows number at most p the row-space factor is extended (`extend`); past p the key
space inverse P is formed once and updated by Woodbury, P' = P - P K'^T (I + K' P K'^T)^-1 K' P,
in place and re-symmetrised, so a batch costs O(m p^2) however many rows came before. P
needs 8 p^2 bytes (0.68 GB at p = 9,216; 59 GB at p = 6 x 14,336): `start` and `add` take a
memory `budget` and refuse a solve that does not fit it before allocating it, naming the
size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


def cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    """The Cholesky factor of `matrix`, or FloatingPointError naming `what`."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if info.item() != 0:
        raise FloatingPointError(f"{what} is not positive definite in {matrix.dtype}")
    return chol


def ridge(d: int, lam, prior, mu, device, dtype=F64):
    """(R = lam I + mu C, d x d; lam; mu) as tensors: a module's regularizer (mu stays None
    without a key prior C)."""
    lam = torch.as_tensor(lam, dtype=dtype, device=device).reshape(())
    r = torch.diag(lam.expand(d))
    if prior is not None:
        mu = torch.as_tensor(mu, dtype=dtype, device=device).reshape(())
        r = r + mu * prior.to(dtype)
    return r, lam, mu


@dataclass
class Factor:
    """What the solve and its backward reuse: per module the Cholesky factor of R_l and
    W_l = R_l^-1 K_l^T (d_l x n), and the Cholesky factor of B (n x n)."""

    chol_b: torch.Tensor
    chol_r: list[torch.Tensor]
    proj: list[torch.Tensor]  # W_l
    keys: list[torch.Tensor]
    lams: list[torch.Tensor]
    priors: list[torch.Tensor | None]
    mus: list[torch.Tensor | None]


def _check_keys(keys) -> None:
    if not keys or any(k.ndim != 2 or k.shape[0] != keys[0].shape[0] for k in keys):
        raise ValueError(f"keys must be n x d_k with the same n rows for every module, got "
                         f"shapes {[tuple(k.shape) for k in keys]}")
    if not all(bool(torch.isfinite(k).all()) for k in keys):
        raise FloatingPointError("keys contain NaN or Inf; nothing to solve")


def factorize(keys: list[torch.Tensor], lams, priors=None, mus=None) -> Factor:
    """The row-space factors for keys K_l (n x d_l, the same n rows), ridge weights lam_l
    and optional key priors C_l with weights mu_l."""
    _check_keys(keys)
    priors = list(priors) if priors is not None else [None] * len(keys)
    mus = list(mus) if mus is not None else [None] * len(keys)
    n, device = keys[0].shape[0], keys[0].device
    b = torch.eye(n, dtype=F64, device=device)
    chol_r, proj, ks, lam_t, mu_t = [], [], [], [], []
    for k, lam, prior, mu in zip(keys, lams, priors, mus):
        k = k.to(F64)
        r, lam, mu = ridge(k.shape[1], lam, prior, mu, device)
        chol = cholesky(r, f"the ridge matrix lam I + mu C (lambda={lam.item():.3g})")
        w = torch.cholesky_solve(k.T.contiguous(), chol)
        b += k @ w
        chol_r.append(chol), proj.append(w), ks.append(k), lam_t.append(lam), mu_t.append(mu)
    chol_b = cholesky(b, f"the least-squares matrix B of {n} rows")
    return Factor(chol_b, chol_r, proj, ks, lam_t, priors, mu_t)


def extend(factor: Factor, keys: list[torch.Tensor]) -> Factor:
    """`factor` with m more rows (keys K'_l, m x d_l) and the same R_l: only the new rows'
    W'_l, their blocks of B and the Cholesky factor's new rows,
        L21 = (L11^-1 B12)^T,   L22 = chol(B22 - L21 L21^T),
    so rows added in turn cost O(m n d_l) per module (equal to `factorize` of all rows, which
    it falls back to where the extension is not positive definite)."""
    chol = factor.chol_b
    new = [k.to(F64) for k in keys]
    if len(new) != len(factor.keys) or any(k.ndim != 2 or k.shape[1] != old.shape[1]
                                           for k, old in zip(new, factor.keys)):
        raise ValueError(f"extend: keys must be m x d_k for each of the factor's "
                         f"{len(factor.keys)} modules, got {[tuple(k.shape) for k in keys]}")
    _check_keys(new)
    proj = [torch.cholesky_solve(k.T.contiguous(), r) for k, r in zip(new, factor.chol_r)]
    b12 = sum(k @ w for k, w in zip(factor.keys, proj))
    b22 = torch.eye(new[0].shape[0], dtype=F64, device=chol.device) + sum(
        k @ w for k, w in zip(new, proj))
    l21 = torch.linalg.solve_triangular(chol, b12, upper=False).T
    l22, info = torch.linalg.cholesky_ex(b22 - l21 @ l21.T)
    keys = [torch.cat([k, k2]) for k, k2 in zip(factor.keys, new)]
    if info.item() != 0:
        return factorize(keys, factor.lams, factor.priors, factor.mus)
    n, m = chol.shape[0], new[0].shape[0]
    full = chol.new_zeros(n + m, n + m)
    full[:n, :n], full[n:, :n], full[n:, n:] = chol, l21, l22
    return Factor(full, factor.chol_r, [torch.cat([w, w2], 1) for w, w2 in
                                        zip(factor.proj, proj)],
                  keys, factor.lams, factor.priors, factor.mus)


def solve(factor: Factor, values: torch.Tensor) -> list[torch.Tensor]:
    """[S_l] (d_l x d_v each, float64) from the summed value shifts D (n x d_v)."""
    a = torch.cholesky_solve(values.to(F64), factor.chol_b)
    return [w @ a for w in factor.proj]


def backward(factor: Factor, shifts, grads):
    """(dL/dD, [dL/dlog lam_l], [dL/dlog mu_l or None]) from G_l = dL/dS_l and S_l."""
    grads = [g.to(F64) for g in grads]
    g = torch.cholesky_solve(sum(w.T @ gl for w, gl in zip(factor.proj, grads)), factor.chol_b)
    d_lam, d_mu = [], []
    for k, chol, gl, s, lam, prior, mu in zip(factor.keys, factor.chol_r, grads, shifts,
                                             factor.lams, factor.priors, factor.mus):
        m = torch.cholesky_solve(gl - k.T @ g, chol)
        s = s.to(F64)
        d_lam.append(-lam * (m * s).sum())
        d_mu.append(None if prior is None else -mu * (m * (prior.to(F64) @ s)).sum())
    return g, d_lam, d_mu


def leverage(factor: Factor) -> float:
    """tr(H) / n with H = Q (I + Q)^-1, Q = sum_l K_l R_l^-1 K_l^T: the mean share of its
    requested shift each row gets (1: all of it)."""
    n = factor.chol_b.shape[0]
    eye = torch.eye(n, dtype=F64, device=factor.chol_b.device)
    return (1 - torch.cholesky_solve(eye, factor.chol_b).diagonal().sum() / n).item()


def diagnostics(keys: list, values, lams, priors=None, mus=None) -> dict[str, float]:
    """How well the solve fits: the relative residual ||sum_l K_l S_l - D|| / ||D|| and the
    mean leverage (`leverage`: 1 when every row is fitted exactly, near 0 when the ridge and
    the prior dominate)."""
    factor = factorize(keys, lams, priors, mus)
    shifts = solve(factor, values)
    d = values.to(F64)
    fit = sum(k @ s for k, s in zip(factor.keys, shifts))
    return {"residual": ((fit - d).norm() / d.norm().clamp_min(1e-30)).item(),
            "leverage": leverage(factor)}


def output_bins(g: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, list[torch.Tensor],
                                                       list[float]]:
    """(U, [column indices of U per bin], [level per bin]) for an output second moment G
    (d_v x d_v): its eigenvectors U, the eigen-directions in `n_bins` bins of equal size by
    eigenvalue, each bin's level the mean of its eigenvalues, the eigenvalues scaled to a
    mean of 1 (so the penalty's weight is on the key prior's scale)."""
    if g.ndim != 2 or g.shape[0] != g.shape[1] or not bool(torch.isfinite(g).all()):
        raise ValueError(f"an output moment must be a finite square matrix, got {tuple(g.shape)}")
    if n_bins < 1:
        raise ValueError(f"output bins must be at least 1, got {n_bins}")
    values, vectors = torch.linalg.eigh(g.to(F64))
    values = values.clamp_min(0)
    values = values / values.mean().clamp_min(1e-300)
    bins = list(torch.argsort(values).chunk(min(n_bins, g.shape[0])))
    return vectors, bins, [values[b].mean().item() for b in bins]


# ------------------------------------------------------------------ rows in turn


@dataclass
class Running:
    """A solve kept across batches of rows: the S_l of all rows so far, and the row-space
    factor (`factor`) or the key-space inverse P (`inverse`)."""

    shifts: list[torch.Tensor]
    rows: int
    lams: list
    priors: list | None
    mus: list | None
    factor: Factor | None = None
    inverse: torch.Tensor | None = None


def key_space_bytes(sizes: list[int]) -> int:
    """Peak bytes of forming P (p x p, float64): A, its factor and P."""
    return 3 * 8 * sum(sizes) ** 2


def row_space_bytes(rows: int, sizes: list[int]) -> int:
    """Bytes of a row-space factor of `rows` rows: B's factor and W_l and K_l, float64."""
    return 8 * (rows * rows + 2 * rows * sum(sizes))


def _in_key_space(rows: int, sizes: list[int], budget: int | None) -> bool:
    """Whether the solve of `rows` rows goes to key space (past p rows), checked against
    `budget` (bytes; None: no limit) before anything is allocated: MemoryError naming the
    size where it does not fit (row space is never smaller than key space past p rows)."""
    key = rows > sum(sizes)
    need = key_space_bytes(sizes) if key else row_space_bytes(rows, sizes)
    if budget is not None and need > budget:
        raise MemoryError(f"the solve of {rows} key rows over p = {sum(sizes)} key dimensions "
                          f"needs {need / 2**30:.1f} GiB in {'key' if key else 'row'} space, "
                          f"more than its budget of {budget / 2**30:.1f} GiB: raise "
                          "solve_memory_gb, or edit fewer modules or fewer facts")
    return key


def key_inverse(keys: list[torch.Tensor], lams, priors=None, mus=None) -> torch.Tensor:
    """P = (K^T K + R)^-1 (p x p, float64) for keys K_l (n x d_l), K = [K_1 .. K_L] and
    R = blockdiag(lam_l I + mu_l C_l)."""
    _check_keys(keys)
    k = torch.cat(keys, 1).to(F64)
    a = k.T @ k
    priors, mus = priors or [None] * len(keys), mus or [None] * len(keys)
    start = 0
    for key, lam, prior, mu in zip(keys, lams, priors, mus):
        d = key.shape[1]
        a[start:start + d, start:start + d] += ridge(d, lam, prior, mu, a.device)[0]
        start += d
    chol = cholesky(a, "the key-space matrix K^T K + R")
    del a
    return torch.cholesky_inverse(chol)


def start(keys: list[torch.Tensor], values: torch.Tensor, lams, priors=None, mus=None,
          budget: int | None = None) -> Running:
    """The solve of n rows (keys K_l, summed shifts D), kept for `add`: in row space up to
    p rows, else with the key-space P (either within `budget` bytes, or MemoryError)."""
    n, sizes = keys[0].shape[0], [k.shape[1] for k in keys]
    if not _in_key_space(n, sizes, budget):
        factor = factorize(keys, lams, priors, mus)
        return Running(solve(factor, values), n, lams, priors, mus, factor)
    inverse = key_inverse(keys, lams, priors, mus)
    shifts = inverse @ (torch.cat(keys, 1).to(F64).T @ values.to(F64))
    return Running(list(shifts.split(sizes)), n, lams, priors, mus, inverse=inverse)


def symmetrize_(matrix: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """matrix <- (matrix + matrix^T) / 2 in place, `block` rows at a time (no p x p copy)."""
    p = matrix.shape[0]
    for i in range(0, p, block):
        j = min(i + block, p)
        mean = (matrix[i:j, i:] + matrix[i:, i:j].T) / 2
        matrix[i:j, i:] = mean
        matrix[i:, i:j] = mean.T
    return matrix


def add(run: Running, keys: list[torch.Tensor], values: torch.Tensor,
        budget: int | None = None) -> tuple[Running, list[torch.Tensor]]:
    """(the solve with m more rows, [S'_l - S_l]) from their keys K'_l (m x d_l) and summed
    shifts D' (m x d_v): recursive least squares (module docstring); equal to `start` of all
    rows to float tolerance. In key space P is updated in place: `run` is used up (unless
    this raises, which happens before P is written)."""
    sizes, m = [s.shape[0] for s in run.shifts], values.shape[0]
    if len(keys) != len(sizes) or any(k.ndim != 2 or k.shape != (m, d)
                                      for k, d in zip(keys, sizes)):
        raise ValueError(f"add: keys must be {m} x d_k for the solve's modules {sizes}, got "
                         f"{[tuple(k.shape) for k in keys]}")
    _check_keys(keys)
    rows, factor, inverse = run.rows + m, None, None
    if run.inverse is None and not _in_key_space(rows, sizes, budget):
        factor = extend(run.factor, keys)
        chol = factor.chol_b
        z = torch.linalg.solve_triangular(chol[run.rows:, run.rows:],
                                          torch.eye(m, dtype=F64, device=chol.device),
                                          upper=False)
        z = torch.linalg.solve_triangular(chol.T, torch.cat([z.new_zeros(run.rows, m), z]),
                                          upper=True)
        gain = torch.cat([w @ z for w in factor.proj])  # A'^-1 K'^T, p x m
    elif run.inverse is None:  # the rows outgrow p: P of all rows, once
        inverse = key_inverse([torch.cat([a, b.to(a)]) for a, b in zip(run.factor.keys, keys)],
                              run.lams, run.priors, run.mus)
        gain = inverse @ torch.cat(keys, 1).to(F64).T
    else:
        k = torch.cat(keys, 1).to(F64)
        u = run.inverse @ k.T
        c = cholesky(torch.eye(m, dtype=F64, device=u.device) + k @ u,
                     "the key-space update I + K' P K'^T")
        gain = torch.cholesky_solve(u.T, c).T  # u (I + K' P K'^T)^-1
        inverse = run.inverse
    shifts = [s.to(F64) for s in run.shifts]
    residual = values.to(F64) - sum(k.to(F64) @ s for k, s in zip(keys, shifts))
    delta = list((gain @ residual).split(sizes))
    if run.inverse is not None:  # last, and in place (680 MB at p = 9,216): `run` is used up
        symmetrize_(inverse.addmm_(gain, u.T, alpha=-1))
    return Running([s + d for s, d in zip(shifts, delta)], rows, run.lams, run.priors, run.mus,
                   factor, inverse), delta
