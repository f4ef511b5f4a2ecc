"""The hypernetwork: maps per-token (key u, value gradient delta) to a weight shift.

One `ShapeNet` per distinct (d_k, d_v) shape of the edited modules, shared by the modules of
that shape, told apart by per-layer scale/shift embeddings. Inputs are normalised by running
mean/std (updated during meta-training only, saved with the network); then residual
low-rank blocks
    y <- y + scale_l * (relu(y A + b) B) + shift_l      (B = 0 at init: the identity)
so an untrained network returns the normalised inputs.

Shift rules, for modules with keys K_l (n x d_k) and value gradients Delta_l (n x d_v):
    MALMEN:  d_j = -eta_l (u_j . u~_j) delta~_j per row and module; the modules of one shape
             share one least-squares solve of sum_l K_l S_l = sum_l D_l (solve.py)
    MEND:    S_l = -eta_l sum_j u~_j delta~_j^T
With `prior=True` (MALMEN only), each layer also holds a key prior C_l (d_k x d_k, set by
`set_prior`, saved with the network) and a learned weight mu_l = exp(log_mu[l]): the solve
adds mu_l ||C_l^1/2 S_l||^2, keeping the outputs on C_l's keys where they were.

Memory stays bounded at any n: the network runs over at most `chunk` rows at a time, and
`backward` accumulates the exact gradient of the proxy <G, S(theta)> chunk by chunk (for
MALMEN, dL/dD comes from the solve's own backward, so the network's graph never spans all
n rows).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import solve


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


class ShapeNet(nn.Module):
    """g_theta for one (d_k, d_v) shape, shared across `n_layers` edited modules, with a
    learned step size eta_l = exp(log_lr[l]) and ridge lambda_l = exp(log_lam[l]) per layer
    (and, with `prior`, a key prior C_l with weight mu_l = exp(log_mu[l]))."""

    def __init__(self, d_k: int, d_v: int, n_layers: int, rank: int = 1920, n_blocks: int = 2,
                 lr: float = 1e-4, log_lam: float = 0.0, prior: bool = False,
                 log_mu: float = 0.0):
        super().__init__()
        self.d_k, self.d_v = d_k, d_v
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
        """MALMEN's desired value shift per row: d_j = -eta_l (u_j . u~_j) delta~_j."""
        u, delta = self(keys, grads, layer)
        return -self.log_lr[layer].exp() * (keys * u).sum(-1, keepdim=True) * delta

    def mend_shift(self, keys, grads, layer: int, chunk: int | None = None) -> torch.Tensor:
        """MEND's S = -eta_l U~^T Delta~ (a sum of rank-one updates, no solve)."""
        total = 0
        for k, g in chunks(keys, grads, chunk):
            u, delta = self(k, g, layer)
            total = total + u.T @ delta
        return -self.log_lr[layer].exp() * total

    def weights(self, layers: list[int]) -> dict:
        """lams, priors, mus (None without a prior) of the solve of modules `layers`."""
        with torch.no_grad():
            none = self.prior is None
            return {"lams": [self.log_lam[i].exp() for i in layers],
                    "priors": None if none else [self.prior[i] for i in layers],
                    "mus": None if none else [self.log_mu[i].exp() for i in layers]}


def chunks(keys, grads, size: int | None):
    """(keys, grads) row blocks of at most `size` rows (one block if size is None)."""
    n = keys.shape[0]
    size = n if not size else size
    return [(keys[i:i + size], grads[i:i + size]) for i in range(0, max(n, 1), size)]


RULES = ("malmen", "mend")


class HyperNetwork(nn.Module):
    """One ShapeNet per distinct shape of the edited modules.

    `shapes` maps module names to (d_k, d_v); the order of names fixes each module's layer
    index within its shape. MALMEN solves the modules of one shape together (`groups`)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rule: str = "malmen", **net_kwargs):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown shift rule {rule!r}; choose one of {list(RULES)}")
        if net_kwargs.get("prior") and rule != "malmen":
            raise ValueError(f"a key prior needs the least-squares solve (rule 'malmen'), "
                             f"not {rule!r}")
        self.rule = rule
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
        self.index, counts = {}, {}
        for name, shape in self.shapes.items():
            self.index[name] = counts.get(shape, 0)
            counts[shape] = self.index[name] + 1
        self.nets = nn.ModuleDict({
            self._key(shape): ShapeNet(*shape, n_layers=n, **net_kwargs)
            for shape, n in counts.items()
        })

    @staticmethod
    def _key(shape) -> str:
        return f"{shape[0]}x{shape[1]}"

    def net(self, name: str) -> ShapeNet:
        return self.nets[self._key(self.shapes[name])]

    def update_norm(self, name: str, keys: torch.Tensor, grads: torch.Tensor) -> None:
        self.net(name).norm.update(torch.cat([keys, grads], -1))

    @property
    def solves(self) -> bool:
        """Whether the shift is a least-squares solve (MALMEN)."""
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

    def groups(self, names) -> list[list[str]]:
        """`names` in solve groups: MALMEN's modules of one shape share a solve; MEND has
        none (one group per module)."""
        if not self.solves:
            return [[n] for n in names]
        by_shape: dict[tuple, list[str]] = {}
        for n in names:
            by_shape.setdefault(self.shapes[n], []).append(n)
        return list(by_shape.values())

    def weights(self, group: list[str]) -> dict:
        """lams, priors, mus of the solve of `group` (`solve.start` and `factorize` take them)."""
        return self.net(group[0]).weights([self.index[n] for n in group])

    @torch.no_grad()
    def values(self, group: list[str], captured: dict, chunk: int | None = None):
        """D = sum_l D_l (n x d_v), the value shift the modules of `group` together are asked
        for (`captured`: {name: (keys, value gradients)})."""
        net = self.net(group[0])
        return sum(torch.cat([net.value_shifts(k, g, self.index[n])
                              for k, g in chunks(*captured[n], chunk)]) for n in group)

    def shifts(self, captured: dict, chunk: int | None = None, factors: dict | None = None,
               lap=None) -> dict[str, torch.Tensor]:
        """{name: S (float64 for MALMEN)} for every module of `captured` ({name: (keys,
        value gradients)}), without grad; `factors` ({}) keeps each group's solve for
        `backward`; `lap(stage)` marks the end of the "hypernetwork" and "solve" stages."""
        lap = lap or (lambda stage: None)
        out = {}
        with torch.no_grad():
            for group in self.groups(captured):
                if not self.solves:
                    name = group[0]
                    out[name] = self.net(name).mend_shift(*captured[name], self.index[name],
                                                          chunk)
                    lap("hypernetwork")
                    continue
                values = self.values(group, captured, chunk)
                lap("hypernetwork")
                factor = solve.factorize([captured[n][0] for n in group], **self.weights(group))
                shifts = solve.solve(factor, values)
                if factors is not None:
                    factors[group[0]] = (factor, shifts)
                out.update(zip(group, shifts))
                lap("solve")
        return out

    def backward(self, captured: dict, grad_shifts: dict, chunk: int | None = None,
                 factors: dict | None = None) -> None:
        """Accumulate the gradient of sum_name <grad_shifts[name], shifts(captured)[name]>
        into the parameters' .grad, at most `chunk` rows in the network's graph at a time
        (`factors`: what `shifts` kept, else solved again). MALMEN: dL/dD, dL/dlog lam and
        dL/dlog mu from the solve's backward, then the proxy sum_j <dL/dd_j, d_j(theta)>."""
        for group in self.groups(captured):
            if not self.solves:
                name = group[0]
                net, layer = self.net(name), self.index[name]
                for k, g in chunks(*captured[name], chunk):
                    (net.mend_shift(k, g, layer) * grad_shifts[name]).sum().backward()
                continue
            factor, shifts = (factors or {}).get(group[0]) or self._solved(group, captured,
                                                                          chunk)
            grad_values, d_lam, d_mu = solve.backward(factor, shifts,
                                                      [grad_shifts[n] for n in group])
            net, layers = self.net(group[0]), [self.index[n] for n in group]
            scalars = [(net.log_lam[i], g) for i, g in zip(layers, d_lam)]
            if net.prior is not None:
                scalars += [(net.log_mu[i], g) for i, g in zip(layers, d_mu)]
            torch.autograd.backward([p for p, _ in scalars], [g.to(p) for p, g in scalars])
            for name, layer in zip(group, layers):
                start = 0
                for k, g in chunks(*captured[name], chunk):
                    part = grad_values[start:start + k.shape[0]].to(k.dtype)
                    (net.value_shifts(k, g, layer) * part).sum().backward()
                    start += k.shape[0]

    @torch.no_grad()
    def _solved(self, group, captured, chunk):
        factor = solve.factorize([captured[n][0] for n in group], **self.weights(group))
        return factor, solve.solve(factor, self.values(group, captured, chunk))

    @torch.no_grad()
    def diagnose(self, captured: dict, chunk: int | None = None) -> list[dict]:
        """`solve.diagnostics` of every solve group, each record naming its modules."""
        return [{"modules": group, **solve.diagnostics(
            [captured[n][0] for n in group], self.values(group, captured, chunk),
            **self.weights(group))} for group in self.groups(captured)]
