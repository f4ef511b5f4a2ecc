"""The editor network: maps per-token (key u, value gradient delta) to (u~, delta~).

One network per distinct (d_k, d_v) shape, shared by the edited modules of that shape,
told apart by per-layer scale/shift embeddings. Inputs are normalised by running
mean/std (updated during meta-training only, saved with the network); then residual
low-rank blocks
    y <- y + scale_l * (relu(y A + b) B) + shift_l      (B = 0 at init: the identity)
so an untrained network returns the normalised inputs.

Shift rules, for one module with keys K (n x d_k) and value gradients Delta (n x d_v):
    MALMEN:  d_j = -eta_l (u_j . u~_j) delta~_j,  S = least squares of K S = D (solve.py)
    MEND:    S = -eta_l sum_j u~_j delta~_j^T
With `prior=True` (MALMEN only), each layer also holds a key prior C_l (d_k x d_k, set by
`set_prior`, saved with the network) and a learned weight mu_l = exp(log_mu[l]): the solve
adds mu_l ||C_l^1/2 S||^2, keeping the outputs on C_l's keys where they were.
With `couple` (MALMEN only), the modules of one shape share one solve (`solve.py`,
coupled): sum_l K_l S_l = sum_l D_l, fitted by all their S_l together, so the fit has rank
up to L d_k instead of d_k (the down_proj of L blocks all write the residual stream).
With `reg_rows` = r, lambda_l and mu_l are the weights per r rows: the solve uses
(n / r) lambda_l and (n / r) mu_l for n rows, so the regularisers keep their weight
against K^T K (which grows with n) whatever the number of facts.

Memory stays bounded at any n: `values`, `shift` and `backward` run the network over at
most `chunk` rows at a time, and `backward` accumulates the exact gradient of the proxy
<G, S(theta)> chunk by chunk (for MALMEN, dL/dD = K A^-1 G comes from the solve's own
backward, so the network's graph never spans all n rows).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .solve import (CoupledRunning, Factor, coupled_backward, coupled_diagnostics,
                    coupled_factorize, coupled_solve, coupled_start, diagnostics, factorize,
                    least_squares, solve, solve_backward, solve_gram)


class RunningNorm(nn.Module):
    """Running mean and std of rows (batched Welford); `update` only during training."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
        n = x.shape[0]
        if n == 0:
            return
        mean, m2 = x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count.fill_(total)

    @property
    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.m2)
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x.dtype), self.std.to(x.dtype)
        return (x - mean) / (std + self.eps)


class Block(nn.Module):
    """Residual low-rank block with per-layer scale and shift."""

    def __init__(self, size: int, rank: int, n_layers: int):
        super().__init__()
        self.down = nn.Parameter(torch.randn(size, rank) / math.sqrt(size))
        self.up = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(rank))
        self.scale = nn.Parameter(torch.ones(n_layers, size))
        self.shift = nn.Parameter(torch.zeros(n_layers, size))

    def forward(self, y: torch.Tensor, layer: int) -> torch.Tensor:
        x = torch.relu(y @ self.down + self.bias) @ self.up
        return y + self.scale[layer] * x + self.shift[layer]


class EditorNet(nn.Module):
    """g_theta for one (d_k, d_v) shape, shared across `n_layers` edited modules, with a
    learned step size eta_l = exp(log_lr[l]) and ridge lambda_l = exp(log_lam[l]) per layer
    (and, with `prior`, a key prior C_l with weight mu_l = exp(log_mu[l]))."""

    def __init__(self, d_k: int, d_v: int, n_layers: int, rank: int = 1920, n_blocks: int = 2,
                 lr: float = 1e-4, log_lam: float = 0.0, prior: bool = False,
                 log_mu: float = 0.0, reg_rows: int | None = None):
        super().__init__()
        self.d_k, self.d_v, self.reg_rows = d_k, d_v, reg_rows
        self.norm = RunningNorm(d_k + d_v)
        self.blocks = nn.ModuleList(Block(d_k + d_v, rank, n_layers) for _ in range(n_blocks))
        self.log_lr = nn.Parameter(torch.full((n_layers,), math.log(lr)))
        self.log_lam = nn.Parameter(torch.full((n_layers,), float(log_lam)))
        self.register_buffer("prior", torch.zeros(n_layers, d_k, d_k) if prior else None)
        if prior:
            self.log_mu = nn.Parameter(torch.full((n_layers,), float(log_mu)))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, layer: int):
        y = self.norm(torch.cat([keys, grads], -1))
        for block in self.blocks:
            y = block(y, layer)
        return y.split([self.d_k, self.d_v], -1)

    def value_shifts(self, keys, grads, layer: int) -> torch.Tensor:
        """MALMEN's desired value shift per token: d_j = -eta_l (u_j . u~_j) delta~_j."""
        u, delta = self(keys, grads, layer)
        return -self.log_lr[layer].exp() * (keys * u).sum(-1, keepdim=True) * delta

    def values(self, keys, grads, layer: int, chunk: int | None = None) -> torch.Tensor:
        """`value_shifts` of all rows, computed `chunk` rows at a time."""
        return torch.cat([self.value_shifts(k, g, layer) for k, g in chunks(keys, grads, chunk)])

    def log_weights(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log lambda, log mu or None) the solve of n rows uses (scaled by n / reg_rows)."""
        scale = math.log(n / self.reg_rows) if self.reg_rows else 0.0
        log_mu = None if self.prior is None else self.log_mu[layer] + scale
        return self.log_lam[layer] + scale, log_mu

    def coupled_weights(self, layers: list[int], n: int) -> dict:
        """lams, priors, mus (None without a prior) of a coupled solve of n rows (no grad)."""
        with torch.no_grad():
            weights = [self.log_weights(layer, n) for layer in layers]
            none = self.prior is None
            return {"lams": [lam.exp() for lam, _ in weights],
                    "priors": None if none else [self.prior[layer] for layer in layers],
                    "mus": None if none else [mu.exp() for _, mu in weights]}

    def coupled_values(self, keys: list, grads: list, layers: list[int], chunk=None):
        """D = sum_l D_l, the value shift all modules together are asked for (no grad)."""
        with torch.no_grad():
            return sum(self.values(k, g, layer, chunk) for k, g, layer in zip(keys, grads, layers))

    def coupled_factor(self, keys: list, layers: list[int], dtype=torch.float32):
        """The coupled solve's factors for keys K_l of `layers` (no grad)."""
        with torch.no_grad():
            return coupled_factorize(keys, dtype=dtype,
                                     **self.coupled_weights(layers, keys[0].shape[0]))

    def coupled_shift(self, keys: list, grads: list, layers: list[int], dtype=torch.float32,
                      chunk: int | None = None, cache: dict | None = None,
                      lap=None) -> list[torch.Tensor]:
        """[S_l] of one coupled solve over modules `layers`: sum_l K_l S_l = sum_l D_l
        (no grad); `cache` keeps the factor and the S_l for `coupled_backward`."""
        with torch.no_grad():
            values = self.coupled_values(keys, grads, layers, chunk)
            if lap is not None:
                lap("hypernetwork")
            factor = self.coupled_factor(keys, layers, dtype)
            shifts = coupled_solve(factor, values)
        if cache is not None:
            cache.update(factor=factor, shifts=shifts)
        if lap is not None:
            lap("solve")
        return [s.to(values.dtype) for s in shifts]

    def coupled_backward(self, keys: list, grads: list, layers: list[int], grad_shifts: list,
                         dtype=torch.float32, chunk: int | None = None,
                         cache: dict | None = None) -> None:
        """Accumulate d(sum_l <G_l, S_l(theta)>)/dtheta into .grad: dL/dD from the coupled
        solve's backward (every module's D_l gets it, as D is their sum), then the proxy
        per module, `chunk` rows at a time."""
        cache = cache or {}
        factor, shifts = cache.get("factor"), cache.get("shifts")
        if factor is None:  # not kept by coupled_shift: solve again
            factor = self.coupled_factor(keys, layers, dtype)
            shifts = coupled_solve(factor, self.coupled_values(keys, grads, layers, chunk))
        grad_values, d_lam, d_mu = coupled_backward(factor, shifts, grad_shifts)
        scalars = []
        for layer, gl, gm in zip(layers, d_lam, d_mu):
            log_lam, log_mu = self.log_weights(layer, keys[0].shape[0])
            scalars += [(log_lam, gl)] + ([] if log_mu is None else [(log_mu, gm)])
        torch.autograd.backward([p for p, _ in scalars], [g.to(p) for p, g in scalars])
        for k_l, g_l, layer in zip(keys, grads, layers):
            start = 0
            for k, g in chunks(k_l, g_l, chunk):
                part = grad_values[start:start + k.shape[0]].to(k.dtype)
                (self.value_shifts(k, g, layer) * part).sum().backward()
                start += k.shape[0]

    def solve(self, keys, values, layer: int, dtype=torch.float32) -> torch.Tensor:
        """S (d_k x d_v) from desired value shifts, solved jointly over all tokens."""
        log_lam, log_mu = self.log_weights(layer, keys.shape[0])
        prior = {} if log_mu is None else {"prior": self.prior[layer], "log_mu": log_mu}
        return least_squares(keys, values, log_lam, dtype, **prior)

    def factor(self, keys, layer: int, dtype=torch.float32) -> Factor:
        """The solve's Cholesky factor for these keys (no grad)."""
        log_lam, log_mu = self.log_weights(layer, keys.shape[0])
        with torch.no_grad():
            mu = None if log_mu is None else log_mu.exp()
            return factorize(keys, log_lam.exp(), dtype,
                             prior=None if log_mu is None else self.prior[layer], mu=mu)

    def malmen_shift(self, keys, grads, layer: int, dtype=torch.float32,
                     chunk: int | None = None, cache: dict | None = None,
                     lap=None) -> torch.Tensor:
        """S (d_k x d_v) solved jointly over all tokens of all edits; `cache` (a dict) keeps
        the value shifts D for `malmen_backward`; `lap(stage)` marks the end of the
        "hypernetwork" and "solve" stages (for timing)."""
        values = self.values(keys, grads, layer, chunk)
        if cache is not None:
            cache["values"] = values.detach()
        if lap is not None:
            lap("hypernetwork")
        shift = self.solve(keys, values, layer, dtype)
        if lap is not None:
            lap("solve")
        return shift

    def mend_shift(self, keys, grads, layer: int, dtype=None,
                   chunk: int | None = None, cache: dict | None = None,
                   lap=None) -> torch.Tensor:
        """S = -eta_l U~^T Delta~ (sum of rank-one updates, no solve)."""
        total = 0
        for k, g in chunks(keys, grads, chunk):
            u, delta = self(k, g, layer)
            total = total + u.T @ delta
        if lap is not None:
            lap("hypernetwork")
        return -self.log_lr[layer].exp() * total

    def malmen_backward(self, keys, grads, layer: int, grad_shift, dtype=torch.float32,
                        chunk: int | None = None, cache: dict | None = None) -> None:
        """Accumulate d<G, S(theta)>/dtheta into the parameters' .grad, `chunk` rows at a
        time: dL/dD = K A^-1 G and dL/dlog(lambda), dL/dlog(mu) from the solve's backward,
        then the proxy sum_j <dL/dd_j, d_j(theta)> per chunk. `cache`: what `malmen_shift`
        kept (D), so the network runs once more, not twice."""
        values = (cache or {}).get("values")
        if values is None:
            with torch.no_grad():
                values = self.values(keys, grads, layer, chunk)
        factor = self.factor(keys, layer, dtype)
        shift = solve(factor, values)
        grad_values, grad_log_lam, grad_log_mu = solve_backward(factor, shift, grad_shift)
        log_lam, log_mu = self.log_weights(layer, keys.shape[0])
        scalars = [(log_lam, grad_log_lam)] + ([] if log_mu is None else [(log_mu, grad_log_mu)])
        torch.autograd.backward([p for p, _ in scalars], [g.to(p) for p, g in scalars])
        grad_values = grad_values.to(values.dtype)
        start = 0
        for k, g in chunks(keys, grads, chunk):
            part = grad_values[start:start + k.shape[0]]
            (self.value_shifts(k, g, layer) * part).sum().backward()
            start += k.shape[0]

    def mend_backward(self, keys, grads, layer: int, grad_shift, dtype=None,
                      chunk: int | None = None, cache: dict | None = None) -> None:
        """Accumulate d<G, S(theta)>/dtheta into .grad, `chunk` rows at a time (S is a sum
        over rows, so the proxy is too)."""
        for k, g in chunks(keys, grads, chunk):
            (self.mend_shift(k, g, layer) * grad_shift).sum().backward()


def chunks(keys, grads, size: int | None):
    """(keys, grads) row blocks of at most `size` rows (one block if size is None)."""
    n = keys.shape[0]
    size = n if not size else size
    return [(keys[i:i + size], grads[i:i + size]) for i in range(0, max(n, 1), size)]


# rule -> (shift, proxy backward)
SHIFT_RULES = {"malmen": (EditorNet.malmen_shift, EditorNet.malmen_backward),
               "mend": (EditorNet.mend_shift, EditorNet.mend_backward)}


class HyperNetwork(nn.Module):
    """One EditorNet per distinct shape of the edited modules.

    `shapes` maps module names to (d_k, d_v); the order of names fixes each module's
    layer index within its shape."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rule: str = "malmen",
                 couple: bool = False, **net_kwargs):
        super().__init__()
        if rule not in SHIFT_RULES:
            raise ValueError(f"unknown shift rule {rule!r}; choose one of {sorted(SHIFT_RULES)}")
        if net_kwargs.get("prior") and rule != "malmen":
            raise ValueError(f"a key prior needs the least-squares solve (rule 'malmen'), "
                             f"not {rule!r}")
        self.rule = rule
        self.couple = couple
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
        self.index, counts = {}, {}
        for name, shape in self.shapes.items():
            self.index[name] = counts.get(shape, 0)
            counts[shape] = self.index[name] + 1
        self.nets = nn.ModuleDict({
            self._key(shape): EditorNet(*shape, n_layers=n, **net_kwargs)
            for shape, n in counts.items()
        })

    @staticmethod
    def _key(shape) -> str:
        return f"{shape[0]}x{shape[1]}"

    def net(self, name: str) -> EditorNet:
        return self.nets[self._key(self.shapes[name])]

    def update_norm(self, name: str, keys: torch.Tensor, grads: torch.Tensor) -> None:
        self.net(name).norm.update(torch.cat([keys, grads], -1))

    @property
    def reg_rows(self) -> int | None:
        """Rows per which lambda and mu are weights (None: not scaled with the row count)."""
        return next(iter(self.nets.values())).reg_rows

    @reg_rows.setter
    def reg_rows(self, rows: int | None) -> None:
        if rows is not None and int(rows) < 1:
            raise ValueError(f"reg_rows must be a positive number of rows or None, not {rows}")
        for net in self.nets.values():
            net.reg_rows = None if rows is None else int(rows)

    @property
    def couple(self) -> bool:
        """Whether the modules of one shape share one solve (MALMEN only)."""
        return self._couple

    @couple.setter
    def couple(self, value: bool) -> None:
        if value and self.rule != "malmen":
            raise ValueError(f"coupling modules needs the least-squares solve (rule 'malmen'), "
                             f"not {self.rule!r}")
        self._couple = bool(value)

    def groups(self, names) -> list[list[str]]:
        """`names` in solve groups: one per shape when coupled, else one per module."""
        if not self.couple:
            return [[n] for n in names]
        by_shape: dict[tuple, list[str]] = {}
        for n in names:
            by_shape.setdefault(self.shapes[n], []).append(n)
        return list(by_shape.values())

    def _group(self, captured: dict, names: list[str]):
        """(network, [keys], [value gradients], [layers]) of a coupled group's modules."""
        return (self.net(names[0]), [captured[n][0] for n in names],
                [captured[n][1] for n in names], [self.index[n] for n in names])

    def coupled_values(self, names: list[str], captured: dict, chunk: int | None = None):
        """The coupled solve's summed desired value shifts D (n x d_v) of modules `names`."""
        net, keys, grads, layers = self._group(captured, names)
        return net.coupled_values(keys, grads, layers, chunk)

    def shifts(self, captured: dict, dtype=torch.float32, chunk: int | None = None,
               caches: dict | None = None, lap=None) -> dict[str, torch.Tensor]:
        """{name: S} for every module of `captured` ({name: (keys, value gradients)}), per
        module or coupled (`couple`); `caches` ({name: dict}) keeps what `backward_all`
        reuses."""
        out = {}
        for group in self.groups(captured):
            cache = None if caches is None else caches[group[0]]
            if not self.couple:
                name = group[0]
                out[name] = self.shift(name, *captured[name], dtype, chunk, cache, lap)
                continue
            net, keys, grads, layers = self._group(captured, group)
            out.update(zip(group, net.coupled_shift(keys, grads, layers, dtype, chunk, cache,
                                                    lap)))
        return out

    def backward_all(self, captured: dict, grad_shifts: dict, dtype=torch.float32,
                     chunk: int | None = None, caches: dict | None = None) -> None:
        """Accumulate the gradient of sum_name <grad_shifts[name], shifts(captured)[name]>
        into the parameters' .grad (`caches`: what `shifts` kept)."""
        for group in self.groups(captured):
            cache = None if caches is None else caches[group[0]]
            if not self.couple:
                name = group[0]
                self.backward(name, *captured[name], grad_shifts[name], dtype, chunk, cache)
                continue
            net, keys, grads, layers = self._group(captured, group)
            net.coupled_backward(keys, grads, layers, [grad_shifts[n] for n in group], dtype,
                                 chunk, cache)

    @property
    def solves(self) -> bool:
        """Whether the shift is a least-squares solve (MALMEN), which `diagnose` inspects."""
        return self.rule == "malmen"

    @property
    def has_prior(self) -> bool:
        return any(net.prior is not None for net in self.nets.values())

    @torch.no_grad()
    def set_prior(self, name: str, prior: torch.Tensor) -> None:
        """Set module `name`'s key prior C (d_k x d_k); the network must have `prior=True`."""
        net = self.net(name)
        if net.prior is None:
            raise ValueError("this hypernetwork has no key prior (build it with prior=True)")
        if tuple(prior.shape) != (net.d_k, net.d_k):
            raise ValueError(f"key prior for {name} must be {net.d_k} x {net.d_k}, "
                             f"got {tuple(prior.shape)}")
        net.prior[self.index[name]] = prior.to(net.prior)

    def shift(self, name: str, keys: torch.Tensor, grads: torch.Tensor,
              dtype=torch.float32, chunk: int | None = None,
              cache: dict | None = None, lap=None) -> torch.Tensor:
        """The d_k x d_v weight shift of module `name` for these keys and value gradients
        (the network runs over `chunk` rows at a time; `cache`, a dict, keeps what
        `backward` can reuse; `lap(stage)` marks the end of each stage, for timing)."""
        rule, _ = SHIFT_RULES[self.rule]
        return rule(self.net(name), keys, grads, self.index[name], dtype, chunk, cache, lap)

    def backward(self, name: str, keys, grads, grad_shift, dtype=torch.float32,
                 chunk: int | None = None, cache: dict | None = None) -> None:
        """Accumulate the gradient of <grad_shift, shift(name, keys, grads)> into the
        parameters' .grad with at most `chunk` rows in the network's graph at a time."""
        _, backward = SHIFT_RULES[self.rule]
        backward(self.net(name), keys, grads, self.index[name], grad_shift, dtype, chunk, cache)

    def values(self, name: str, keys, grads, chunk: int | None = None) -> torch.Tensor:
        """MALMEN's desired value shifts D of module `name` (n x d_v)."""
        return self.net(name).values(keys, grads, self.index[name], chunk)

    @staticmethod
    @torch.no_grad()
    def statistics(keys, values, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """MALMEN's sufficient statistics of rows with keys K and desired value shifts D
        (`values`): K^T K (d_k x d_k), K^T D (d_k x d_v) and the row count; sums over
        batches give their joint solve (`solve_statistics`)."""
        k = keys.to(dtype)
        return {"ktk": k.T @ k, "ktd": k.T @ values.to(dtype),
                "rows": torch.tensor([keys.shape[0]], dtype=torch.float64)}

    def solve_values(self, name: str, keys, values, dtype=torch.float32) -> torch.Tensor:
        """MALMEN's S of module `name` from keys and desired value shifts D."""
        return self.net(name).solve(keys, values, self.index[name], dtype)

    @torch.no_grad()
    def start_coupled(self, names: list[str], keys: list, values,
                      dtype=torch.float32) -> CoupledRunning:
        """The coupled solve of modules `names` (one shape) from their keys and the summed
        desired value shifts D (n x d_v), kept for more rows (`solve.coupled_add`)."""
        net, layers = self.net(names[0]), [self.index[n] for n in names]
        return coupled_start(keys, values, dtype=dtype,
                             **net.coupled_weights(layers, keys[0].shape[0]))

    @torch.no_grad()
    def solve_statistics(self, name: str, stats: dict[str, torch.Tensor],
                         dtype=torch.float32) -> torch.Tensor:
        """S (d_k x d_v) of the joint solve whose statistics are `stats` (`statistics`,
        summed): lambda and mu as for that many rows in one batch."""
        net, layer = self.net(name), self.index[name]
        log_lam, log_mu = net.log_weights(layer, int(stats["rows"].item()))
        prior = {} if log_mu is None else {"prior": net.prior[layer], "mu": log_mu.exp()}
        return solve_gram(stats["ktk"], stats["ktd"], log_lam.exp(), dtype, **prior)

    @torch.no_grad()
    def diagnose_all(self, captured: dict, chunk: int | None = None) -> list[dict]:
        """`diagnose` of every solve: per module, or per coupled group (`couple`), each
        record naming its modules."""
        out = []
        for group in self.groups(captured):
            if not self.couple:
                out.append({"modules": group, **self.diagnose(group[0], *captured[group[0]],
                                                                chunk)})
                continue
            net, keys, grads, layers = self._group(captured, group)
            values = net.coupled_values(keys, grads, layers, chunk)
            out.append({"modules": group, **coupled_diagnostics(
                keys, values, **net.coupled_weights(layers, keys[0].shape[0]))})
        return out

    @torch.no_grad()
    def diagnose(self, name: str, keys, grads, chunk: int | None = None) -> dict[str, float]:
        """`solve.diagnostics` of module `name`'s MALMEN solve for these keys and gradients."""
        net, layer = self.net(name), self.index[name]
        log_lam, log_mu = net.log_weights(layer, keys.shape[0])
        prior = {} if log_mu is None else {"prior": net.prior[layer], "mu": log_mu.exp()}
        return diagnostics(keys, net.values(keys, grads, layer, chunk), log_lam.exp(), **prior)
