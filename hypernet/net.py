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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .solve import least_squares


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
        """MALMEN's desired value shift per token: d_j = -eta_l (u_j . u~_j) delta~_j."""
        u, delta = self(keys, grads, layer)
        return -self.log_lr[layer].exp() * (keys * u).sum(-1, keepdim=True) * delta

    def solve(self, keys, values, layer: int, dtype=torch.float32) -> torch.Tensor:
        """S (d_k x d_v) from desired value shifts, solved jointly over all tokens."""
        prior = {} if self.prior is None else {"prior": self.prior[layer],
                                                "log_mu": self.log_mu[layer]}
        return least_squares(keys, values, self.log_lam[layer], dtype, **prior)

    def malmen_shift(self, keys, grads, layer: int, dtype=torch.float32) -> torch.Tensor:
        """S (d_k x d_v) solved jointly over all tokens of all edits."""
        return self.solve(keys, self.value_shifts(keys, grads, layer), layer, dtype)

    def mend_shift(self, keys, grads, layer: int, dtype=None) -> torch.Tensor:
        """S = -eta_l U~^T Delta~ (sum of rank-one updates, no solve)."""
        u, delta = self(keys, grads, layer)
        return -self.log_lr[layer].exp() * (u.T @ delta)


SHIFT_RULES = {"malmen": EditorNet.malmen_shift, "mend": EditorNet.mend_shift}


class HyperNetwork(nn.Module):
    """One EditorNet per distinct shape of the edited modules.

    `shapes` maps module names to (d_k, d_v); the order of names fixes each module's
    layer index within its shape."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rule: str = "malmen", **net_kwargs):
        super().__init__()
        if rule not in SHIFT_RULES:
            raise ValueError(f"unknown shift rule {rule!r}; choose one of {sorted(SHIFT_RULES)}")
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
              dtype=torch.float32) -> torch.Tensor:
        """The d_k x d_v weight shift of module `name` for these keys and value gradients."""
        return SHIFT_RULES[self.rule](self.net(name), keys, grads, self.index[name], dtype)
