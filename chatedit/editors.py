"""Editing methods: one base that owns the edited modules and their fp32 master copy, and
the shift rule as the single point of variation; each with its config dataclass (registered
in `chatedit.methods`).

    Unedited     "none": the unedited model through the same pipeline
    HyperMethod  "malmen" | "mend": keys and value gradients -> hypernetwork -> shift
    FineTune     "ft", baseline: gradient steps on the edited modules, same facts

`compute_shifts(batch, earlier, state)` is the one way every caller (the `Editor` API, the
evaluation, meta-training's validation, the benchmark) gets an edit's shifts: a pure
function of the batch, the statistics the earlier batches left (`earlier`) and, as a cache,
the running solve the previous call returned (`state`). It returns the shifts, this batch's
statistics and the new running solve; it changes nothing (the weights are as they were).
`apply(shifts)` writes W <- W_master + S, `restore()` writes the master back, so weights
after restore are bitwise equal to before (never restored by subtracting).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypernet import HyperNetwork, solve

from .chat import IGNORE, encode_facts
from .lm import ChatLM, capture, first_block, forward, output_moments, row_chunks, wide
from .methods import conform, option
from .models import kv_shape, memory_budget, set_weight_kv, weight_kv


def _no_lap(stage: str) -> None:
    pass


@dataclass
class Shifts:
    """What `compute_shifts` returns: {module: S (d_k x d_v)}; the statistics a later batch
    needs of this one (kept with it in the history and in saved edits; MALMEN: keys, summed
    value shifts and rows; AlphaEdit: K^T K); and the method's running solve over the earlier
    batches and this one, a cache the next call may reuse (`state`)."""

    shifts: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None


class EditMethod:
    """Base of the editing methods. Subclasses implement `compute_shifts` and `from_config`;
    `needs_subject`: every fact must name a subject that occurs in its prompt."""

    needs_subject = False

    @classmethod
    def from_config(cls, model, tokenizer, modules: dict, config, system=None, state=None):
        """The method for `config` (its dataclass); `state`: the tensors a meta-trained
        checkpoint holds for it (None for methods with nothing learned)."""
        return cls(model, tokenizer, modules, system)

    def __init__(self, model, tokenizer, modules: dict, system: str | None = None):
        self.lm = ChatLM(model, tokenizer, system, first_block(model, modules))
        self.modules = modules
        for p in model.parameters():
            p.requires_grad_(False)
        self.master = {n: wide(weight_kv(m).detach()).clone() for n, m in modules.items()}

    # the loaded model's parts (`self.lm`), as every method reads them
    model = property(lambda self: self.lm.model)
    tokenizer = property(lambda self: self.lm.tokenizer)
    system = property(lambda self: self.lm.system)
    first = property(lambda self: self.lm.first)

    def compute_shifts(self, batch, earlier=(), state=None, lap=_no_lap) -> Shifts:
        """The shifts for all facts of the batch at once, on top of the batches whose
        statistics are `earlier` (in order; `Shifts.stats` of each), with `state` the
        `Shifts.state` returned for exactly those batches (or None: rebuilt from `earlier`).
        The batch may carry cached hidden states (chatedit.lm). `lap(stage)` is called at
        the end of each stage (`timing.Laps` times them). Weights are unchanged on return."""
        raise NotImplementedError

    def batch(self, facts):
        device = next(self.model.parameters()).device
        batch = encode_facts(self.tokenizer, facts, self.system)
        return {k: v.to(device) for k, v in batch.items()}

    def edit(self, facts) -> dict[str, torch.Tensor]:
        """Compute and apply the shifts for `facts` (dicts or records with prompt, target)."""
        shifts = self.compute_shifts(self.batch(facts)).shifts
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

    @contextmanager
    def kept_weights(self):
        """Inside, the edited modules may be written; on exit they hold what they held on
        entry (yields those weights, fp32)."""
        start = {n: wide(weight_kv(m).detach()).clone() for n, m in self.modules.items()}
        try:
            yield start
        finally:
            for n, m in self.modules.items():
                set_weight_kv(m, start[n])

    @contextmanager
    def unedited(self):
        """Inside: the edited modules hold their master (unedited) weights."""
        with self.kept_weights():
            self.restore()
            yield


@dataclass
class NoConfig:
    name: str = option("unedited", "the method's label in run folders and results")
    rule: str = option("none", "the registered method")


class Unedited(EditMethod):
    """The unedited model through the same pipeline: every shift is zero."""

    def compute_shifts(self, batch, earlier=(), state=None, lap=_no_lap):
        return Shifts({n: torch.zeros_like(w) for n, w in self.master.items()})


@dataclass
class HyperConfig:
    """Options of the hypernetwork methods (MALMEN, MEND): the network, the solve, the rows."""

    # old option names (in older checkpoints) -> today's; options since removed -> the values
    # that behave as today's code (the first: how it runs; a checkpoint saved with another
    # value loads with a warning); what checkpoints saved before an option existed had
    RENAMED = {"lr": "init_step_size", "log_lam": "init_log_lam", "log_mu": "init_log_mu"}
    REMOVED = {"solve_dtype": ("float64", "float32"), "eot_rows": (True,), "reg_rows": (None,),
               "couple": (True,)}
    BEFORE = {"couple": False}

    name: str = option("malmen", "the method's label in run folders and results")
    rule: str = option("malmen", "the registered method: malmen or mend")
    rank: int = option(1920, "rank of each residual block of the hypernetwork")
    n_blocks: int = option(2, "residual blocks of the hypernetwork")
    init_step_size: float = option(3e-4, "initial per-layer step size eta (learned)")
    init_log_lam: float = option(0.0, "initial per-layer log lambda of the solve (learned; "
                                 "MALMEN)")
    hyper_chunk: int = option(1024, "key rows per hypernetwork forward (bounds memory at any N)",
                              test_time=True)
    prior: bool = option(True, "key prior C (second moment of the edited modules' keys on the "
                         "locality answers) in the solve: (K^T K + lam I + mu C) S = K^T D")
    init_log_mu: float = option(4.0, "initial per-layer log mu, the prior's weight (learned)")
    step_scale: float = option(1.0, "test-time multiplier of the learned step size "
                               "(meta-training uses 1)", test_time=True)
    joint: bool = option(True, "MALMEN, editing on top of earlier edits: re-solve jointly with "
                         "the earlier batches' statistics (keys and value shifts captured on "
                         "the unedited weights), as if all were edited at once; false: stack "
                         "each batch's own shift, captured on the edited model",
                         test_time=True)
    solve_memory_gb: float | None = option(None, "most memory the solve may hold (GiB); a "
                                           "solve that needs more is refused before it is "
                                           "built (null: half the memory available)",
                                           test_time=True)
    out_mu: float = option(0.0, "weight mu_o of the output-side preservation term "
                           "mu_o tr(S^T C S G), G the second moment of the loss gradients at the "
                           "modules' outputs on the base model's own answers to instruction and "
                           "harmful-request prompts (0: off; needs the key prior C)",
                           test_time=True)
    out_bins: int = option(8, "output directions grouped into this many solves (by their "
                           "eigenvalue of G)", test_time=True)


@dataclass
class MalmenConfig(HyperConfig):
    """MALMEN: value shifts per token, least squares across all edits (the defaults)."""


@dataclass
class MendConfig(HyperConfig):
    """MEND: the same pipeline and network; S = -eta sum_j u~_j delta~_j^T (no solve)."""

    name: str = option("mend", "the method's label in run folders and results")
    rule: str = option("mend", "the registered method: malmen or mend")
    REMOVED = {**HyperConfig.REMOVED, "couple": (False, True)}  # MEND has no solve

    init_step_size: float = option(3e-6, "initial per-layer step size eta (learned)")
    prior: bool = option(False, "MEND has no solve, so no key prior")


def hypernet_bytes(shapes: dict[str, tuple[int, int]], config: HyperConfig) -> int:
    """Bytes of the hypernetwork `build_hypernet` makes (float32): its parameters, running
    normalisers and key priors."""
    total = 0
    for shape in set(shapes.values()):
        n, size = sum(s == shape for s in shapes.values()), sum(shape)
        blocks = config.n_blocks * (2 * size * config.rank + config.rank + 2 * n * size)
        priors = n * shape[0] ** 2 if config.prior else 0
        total += 4 * (blocks + 3 * n + priors) + 8 * (2 * size + 1)
    return total


def build_hypernet(modules: dict, config: HyperConfig, budget: int | None = None) -> HyperNetwork:
    """The hypernetwork for `config`, refused before anything is allocated where it needs
    more than `budget` bytes (default: half the memory available)."""
    shapes = {n: kv_shape(m) for n, m in modules.items()}
    need, budget = hypernet_bytes(shapes, config), budget or memory_budget(None)
    if need > budget:
        priors = 4 * sum(d_k ** 2 for d_k, _ in shapes.values()) if config.prior else 0
        raise MemoryError(f"the hypernetwork for {len(shapes)} modules of shapes "
                          f"{sorted(set(shapes.values()))} needs {need / 2**30:.1f} GiB "
                          f"({priors / 2**30:.1f} GiB of it key priors), more than the "
                          f"{budget / 2**30:.1f} GiB available: lower editor.rank, set "
                          "editor.prior=false or edit fewer modules")
    prior = {"prior": True, "log_mu": config.init_log_mu} if config.prior else {}
    return HyperNetwork(shapes, rule=config.rule, rank=config.rank, n_blocks=config.n_blocks,
                        lr=config.init_step_size, log_lam=config.init_log_lam, **prior)


class HyperMethod(EditMethod):
    """MALMEN or MEND (the hypernetwork's `rule`).

    chunk_size: facts per capture forward/backward; hyper_chunk: key rows per hypernetwork
    forward (memory stays bounded at any number of facts); step_scale: a test-time multiplier
    of the shift (MALMEN's S is linear in D, so this scales the learned step size eta)."""

    def __init__(self, model, tokenizer, modules, hypernet: HyperNetwork, system=None,
                 chunk_size: int = 128, hyper_chunk: int = 1024, step_scale: float = 1.0,
                 joint: bool = True, solve_memory_gb: float | None = None,
                 out_mu: float = 0.0, out_bins: int = 8):
        super().__init__(model, tokenizer, modules, system)
        self.hypernet, self.chunk_size, self.hyper_chunk = hypernet, chunk_size, hyper_chunk
        self.step_scale, self.joint = step_scale, joint and hypernet.solves
        self.solve_memory_gb = solve_memory_gb
        if out_mu < 0 or out_bins < 1:
            raise ValueError(f"out_mu must be >= 0 and out_bins >= 1, got {out_mu}, {out_bins}")
        if out_mu and not hypernet.has_prior:
            raise ValueError("out_mu (output-side preservation) needs an editor trained with "
                             "the key prior (editor.prior=true)")
        self.out_mu, self.out_bins = out_mu, out_bins
        self.output_moments: dict[str, torch.Tensor] | None = None  # G per module, when used

    @classmethod
    def from_config(cls, model, tokenizer, modules, config: HyperConfig, system=None,
                    state=None) -> HyperMethod:
        """A fresh hypernetwork for `config` (meta-training starts from it), or with
        `state` (a checkpoint's hypernetwork tensors) the trained one; errors name what
        does not fit."""
        hypernet = build_hypernet(modules, config)
        if state is not None:
            expected = hypernet.state_dict()
            wrong = [k for k in expected
                     if k not in state or state[k].shape != expected[k].shape]
            if wrong:
                shapes = {n: kv_shape(m) for n, m in modules.items()}
                raise ValueError(f"the editor checkpoint does not fit this model's edited "
                                 f"modules {shapes} (mismatched: {wrong[:3]})")
            hypernet.load_state_dict(state)
        hypernet.to(next(model.parameters()).device)
        return cls(model, tokenizer, modules, hypernet, system, hyper_chunk=config.hyper_chunk,
                   step_scale=config.step_scale, joint=config.joint,
                   solve_memory_gb=config.solve_memory_gb, out_mu=config.out_mu,
                   out_bins=config.out_bins)

    def capture(self, batch):
        """Keys and value gradients of all facts, captured `chunk_size` facts at a time."""
        parts = [capture(self.model, self.modules, b, self.first)[0]
                 for b in row_chunks(batch, self.chunk_size)]
        return {n: (torch.cat([p[n][0] for p in parts]), torch.cat([p[n][1] for p in parts]))
                for n in self.modules}

    def compute_shifts(self, batch, earlier=(), state=None, lap=_no_lap):
        """MALMEN (`joint`): keys and value gradients captured on the unedited weights, and
        the shift that takes the earlier batches' solve S(earlier) to the solve of all rows,
        S(earlier + this), so the weights (master + the sum of the batches' shifts) equal one
        edit of every fact to float tolerance. Each solve group keeps its running solve
        (`hypernet.solve.start` / `add`), so a batch in turn costs its own rows' update, not
        a solve of every row so far."""
        hn = self.hypernet
        earlier = list(earlier) if self.joint else []
        joint = bool(earlier)
        if joint and not all(f"{n}:keys" in b for b in earlier for n in self.modules):
            warnings.warn("an earlier batch has no statistics of this solve (edited by another "
                          "method, with joint=false, or saved without them): this batch is "
                          "stacked, not solved jointly", stacklevel=3)
            earlier, joint = [], False
        with self.unedited() if joint else nullcontext():
            captured = self.capture(batch)
        lap("capture")
        if not hn.solves:  # MEND: a shift per module, nothing kept
            shifts = hn.shifts(captured, self.hyper_chunk, lap=lap)
            return Shifts({n: self.step_scale * s for n, s in shifts.items()})
        budget = memory_budget(next(self.model.parameters()).device, self.solve_memory_gb)
        shifts, stats, runs = {}, {}, {}
        for group in hn.groups(captured):
            keys = [captured[n][0] for n in group]
            values = hn.values(group, captured, self.hyper_chunk)
            lap("hypernetwork")
            stats.update({f"{n}:keys": k.float().cpu() for n, k in zip(group, keys)})
            stats.update({f"{n}:rows": torch.tensor([k.shape[0]], dtype=torch.float64)
                          for n, k in zip(group, keys)})
            stats[f"{group[0]}:values"] = values.float().cpu()
            parts = self.solves(group)
            kept = (state or {}).get(group[0]) or [None] * len(parts)
            runs[group[0]], total = [], [0.0] * len(group)
            for (weights, basis), run in zip(parts, kept):
                part = values if basis is None else values.to(basis) @ basis
                if not joint:  # the first batch: its own solve, as for any single edit
                    run = solve.start(keys, part, budget=budget // len(parts), **weights)
                    new = run.shifts
                else:
                    run, new = self.add(group, earlier, run, keys, part, budget // len(parts),
                                        weights, basis)
                runs[group[0]].append(run)
                total = [t + (s if basis is None else s @ basis.T) for t, s in zip(total, new)]
            shifts.update({n: self.step_scale * s.to(values.dtype) for n, s in zip(group, total)})
            lap("solve")
        return Shifts(shifts, stats, runs) if self.joint else Shifts(shifts)

    def solves(self, group) -> list[tuple[dict, torch.Tensor | None]]:
        """The solves of `group`: [(weights, U_b)]: one with the learned weights (U_b None),
        or with output-side preservation (`out_mu`) one per bin of output directions (U_b:
        their eigenvectors of G, d_v x m_b), its mus raised by out_mu x the bin's level
        (`hypernet.solve.output_bins`)."""
        weights = self.hypernet.weights(group)
        if not self.out_mu:
            return [(weights, None)]
        if self.output_moments is None:
            with self.unedited():
                self.output_moments = preservation_moments(self)
        g = sum(self.output_moments[n] for n in group) / len(group)
        basis, bins, levels = solve.output_bins(g, self.out_bins)
        return [({**weights, "mus": [mu + self.out_mu * level for mu in weights["mus"]]},
                 basis[:, b]) for b, level in zip(bins, levels)]

    @torch.no_grad()
    def add(self, group, earlier, run, keys, values, budget, weights, basis=None):
        """(the running solve of `group` over the rows of `earlier` and these, this batch's
        change of its S_l): `run` updated in place where given (`Shifts.state` of exactly
        `earlier`), else the earlier rows' solve rebuilt from their statistics (their values
        times `basis` where given, as `values` are); where the update is not positive
        definite, every row solved again."""
        def earlier_rows():
            keys_ = [torch.cat([b[f"{n}:keys"] for b in earlier]).to(k) for n, k in
                     zip(group, keys)]
            old = torch.cat([b[f"{group[0]}:values"] for b in earlier]).to(values)
            return keys_, old if basis is None else old @ basis

        if run is None:
            run = solve.start(*earlier_rows(), budget=budget, **weights)
        try:
            return solve.add(run, keys, values, budget)
        except FloatingPointError:
            old_keys, old_values = earlier_rows()
            old = [s.clone() for s in run.shifts]
            every = solve.start([torch.cat(p) for p in zip(old_keys, keys)],
                                torch.cat([old_values, values]), budget=budget, **weights)
            return every, [s - o.to(s) for s, o in zip(every.shifts, old)]


def preservation_moments(method: HyperMethod, n: int = 160, tokens: int = 40) -> dict:
    """`lm.output_moments` of `method`'s modules on the base model's own greedy answers
    (cached on disk) to the first `n` instruction and `n` harmful-request prompts of their
    train splits (the conversations meta-training's locality uses: `prompts.SOURCES`);
    computed once per loaded model, modules and system prompt (kept on the model object;
    call it with the weights unedited)."""
    from .prompts import base_responses, conversation_rows

    kept = method.model.__dict__.setdefault("_chatedit_output_moments", {})
    key = (tuple(method.modules), method.system, n, tokens)
    if key in kept:
        return kept[key]
    rows = []
    for source in ("instruction", "harmful"):
        pairs = base_responses(method.model, method.tokenizer, source, n, tokens, 400,
                               method.system)
        rows += conversation_rows(method.tokenizer, pairs, method.system)
    kept[key] = output_moments(method.model, method.tokenizer, rows, method.modules,
                               method.first)
    return kept[key]


@dataclass
class FTConfig:
    name: str = option("ft", "the method's label in run folders and results")
    rule: str = option("ft", "the registered method")
    steps: int = option(20, "Adam steps on the edited modules")
    lr: float = option(1e-2, "Adam's learning rate")
    chunk_size: int = option(128, "facts per forward/backward; their gradients add up to the "
                             "full batch's, so memory is bounded at any N")


class FineTune(EditMethod):
    """Fine-tuning baseline: `steps` Adam steps on the edited modules only, on the mean
    cross-entropy of the targets over all facts (the same facts and chat formatting as the
    editors), its gradient accumulated `chunk_size` facts at a time."""

    def __init__(self, model, tokenizer, modules, steps: int = 20, lr: float = 1e-2,
                 system=None, chunk_size: int = 128):
        super().__init__(model, tokenizer, modules, system)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.steps, self.lr, self.chunk_size = steps, lr, chunk_size

    @classmethod
    def from_config(cls, model, tokenizer, modules, config: FTConfig, system=None, state=None):
        config = conform(config, FTConfig)
        return cls(model, tokenizer, modules, config.steps, config.lr, system, config.chunk_size)

    def compute_shifts(self, batch, earlier=(), state=None, lap=_no_lap):
        weights = [m.weight for m in self.modules.values()]
        parts = list(row_chunks(batch, self.chunk_size))
        n_labels = int((batch["labels"][:, 1:] != IGNORE).sum())
        with self.kept_weights() as start:  # back to the weights it started from
            for w in weights:
                w.requires_grad_(True)
            opt = torch.optim.Adam(weights, lr=self.lr)
            try:
                with torch.enable_grad():
                    for _ in tqdm(range(self.steps), desc=f"fine-tune ({len(parts)} chunks)",
                                  leave=False, delay=5):  # shown after 5 s
                        opt.zero_grad()
                        for part in parts:  # sum over chunks of CE / all labels = the mean
                            logits, labels, _ = forward(self.model, part, self.first)
                            loss = F.cross_entropy(logits, labels, reduction="sum") / n_labels
                            loss.backward()
                        opt.step()
                shifts = {n: wide(weight_kv(m).detach()) - start[n]
                          for n, m in self.modules.items()}
            finally:
                for w in weights:
                    w.requires_grad_(False)
                    w.grad = None
        lap("fine-tune")
        return Shifts(shifts)
