"""Editors: one base that owns the edited modules and their fp32 master copy, and the
shift rule as the single point of variation.

    HyperEditor  rule="malmen" | "mend": keys and value gradients -> hypernetwork -> shift
    FTEditor     baseline: gradient steps on the edited modules, same facts

`edit(facts)` computes every module's shift for all facts at once and applies
W <- W_master + S; `restore()` writes the master back, so weights after restore are
bitwise equal to before (never restored by subtracting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hypernet import HyperNetwork

from .chat import encode_facts
from .lm import capture, first_block, forward, row_chunks
from .models import DTYPES, kv_shape, set_weight_kv, weight_kv


class BaseEditor:
    """Base editor. Subclasses implement `compute_shifts(batch)`."""

    def __init__(self, model, tokenizer, modules: dict, system: str | None = None):
        self.model, self.tokenizer, self.modules, self.system = model, tokenizer, modules, system
        for p in model.parameters():
            p.requires_grad_(False)
        self.master = {n: weight_kv(m).detach().float().clone() for n, m in modules.items()}
        self.first = first_block(model, modules)

    def compute_shifts(self, batch) -> dict[str, torch.Tensor]:
        """{module name: S (d_k x d_v)} for all facts of the batch at once; leaves the
        weights unchanged. The batch may carry cached hidden states (editor.lm)."""
        raise NotImplementedError

    def batch(self, facts):
        device = next(self.model.parameters()).device
        batch = encode_facts(self.tokenizer, facts, self.system)
        return {k: v.to(device) for k, v in batch.items()}

    def edit(self, facts) -> dict[str, torch.Tensor]:
        """Compute and apply the shifts for `facts` (dicts or records with prompt, target)."""
        shifts = self.compute_shifts(self.batch(facts))
        self.apply(shifts)
        return shifts

    def apply(self, shifts: dict[str, torch.Tensor]) -> None:
        """W <- W_master + S for every module (all checked before any is written)."""
        for name, s in shifts.items():
            if tuple(s.shape) != kv_shape(self.modules[name]):
                raise ValueError(f"shift for {name} has shape {tuple(s.shape)}, expected "
                                 f"{kv_shape(self.modules[name])}")
            if not torch.isfinite(s).all():
                raise FloatingPointError(f"shift for {name} contains NaN or Inf; weights unchanged")
        for name, s in shifts.items():
            set_weight_kv(self.modules[name], self.master[name] + s.to(self.master[name]))

    def restore(self) -> None:
        for name, module in self.modules.items():
            set_weight_kv(module, self.master[name])


class NoEditor(BaseEditor):
    """The unedited model through the same pipeline: every shift is zero."""

    def compute_shifts(self, batch):
        return {n: torch.zeros_like(w) for n, w in self.master.items()}


def build_hypernet(modules: dict, editor_cfg) -> HyperNetwork:
    prior = ({"prior": True, "log_mu": editor_cfg.log_mu} if editor_cfg.get("prior", False)
             else {})
    return HyperNetwork({n: kv_shape(m) for n, m in modules.items()}, rule=editor_cfg.rule,
                        rank=editor_cfg.rank, n_blocks=editor_cfg.n_blocks, lr=editor_cfg.lr,
                        log_lam=editor_cfg.log_lam, reg_rows=editor_cfg.get("reg_rows"),
                        **prior)


def hyper_options(editor_cfg) -> dict:
    """HyperEditor's keyword arguments from an editor config (conf/editor/*.yaml, or the
    one a checkpoint carries; older checkpoints lack the newer keys)."""
    get = editor_cfg.get
    return {"solve_dtype": DTYPES[get("solve_dtype", "float32")],
            "hyper_chunk": get("hyper_chunk", 1024), "eot_rows": get("eot_rows", True)}


class HyperEditor(BaseEditor):
    """MALMEN or MEND (the hypernetwork's `rule`).

    chunk_size: facts per capture forward/backward; hyper_chunk: key rows per hypernetwork
    forward (memory stays bounded at any number of facts); eot_rows: whether the rows that
    predict the end-of-turn token enter K and D; step_scale: a test-time multiplier of the
    shift (MALMEN's S is linear in D, so this scales the learned step size eta)."""

    def __init__(self, model, tokenizer, modules, hypernet: HyperNetwork, system=None,
                 solve_dtype=torch.float32, chunk_size: int = 128, hyper_chunk: int = 4096,
                 eot_rows: bool = True, step_scale: float = 1.0):
        super().__init__(model, tokenizer, modules, system)
        self.hypernet, self.solve_dtype, self.chunk_size = hypernet, solve_dtype, chunk_size
        self.hyper_chunk, self.eot_rows, self.step_scale = hyper_chunk, eot_rows, step_scale

    def capture(self, batch):
        """Keys and value gradients of all facts, captured `chunk_size` facts at a time."""
        parts = [capture(self.model, self.modules, b, self.first, eot_rows=self.eot_rows)[0]
                 for b in row_chunks(batch, self.chunk_size)]
        return {n: (torch.cat([p[n][0] for p in parts]), torch.cat([p[n][1] for p in parts]))
                for n in self.modules}

    def compute_shifts(self, batch, captured=None):
        captured = captured if captured is not None else self.capture(batch)
        with torch.no_grad():
            return {name: self.step_scale * self.hypernet.shift(name, k, d, self.solve_dtype,
                                                                self.hyper_chunk)
                    for name, (k, d) in captured.items()}


class FTEditor(BaseEditor):
    """Fine-tuning baseline: `steps` Adam steps on the edited modules only, on the mean
    cross-entropy of the targets (the same facts and chat formatting as the editors)."""

    def __init__(self, model, tokenizer, modules, steps: int = 20, lr: float = 1e-4,
                 system=None):
        super().__init__(model, tokenizer, modules, system)
        self.steps, self.lr = steps, lr

    def compute_shifts(self, batch):
        start = {n: weight_kv(m).detach().float().clone() for n, m in self.modules.items()}
        weights = [m.weight for m in self.modules.values()]
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(weights, lr=self.lr)
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    logits, labels, _ = forward(self.model, batch, self.first)
                    loss = F.cross_entropy(logits, labels)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            shifts = {n: weight_kv(m).detach().float() - start[n]
                      for n, m in self.modules.items()}
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
            for n, m in self.modules.items():  # back to the weights it started from
                set_weight_kv(m, start[n])
        return shifts
