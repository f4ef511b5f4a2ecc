"""Editors: one base that owns the edited modules and their fp32 master copy, and the
shift rule as the single point of variation; each with its config dataclass (registered
in `editor.methods`).

    NoEditor     "none": the unedited model through the same pipeline
    HyperEditor  "malmen" | "mend": keys and value gradients -> hypernetwork -> shift
    FTEditor     "ft", baseline: gradient steps on the edited modules, same facts

`edit(facts)` computes every module's shift for all facts at once and applies
W <- W_master + S; `restore()` writes the master back, so weights after restore are
bitwise equal to before (never restored by subtracting).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypernet import HyperNetwork
from hypernet.solve import CoupledRunning, coupled_add

from .chat import IGNORE, encode_facts
from .lm import ChatLM, capture, first_block, forward, row_chunks
from .methods import conform, option
from .models import DTYPES, kv_shape, set_weight_kv, weight_kv


def _no_lap(stage: str) -> None:
    pass


class BaseEditor:
    """Base editor. Subclasses implement `compute_shifts(batch, lap)` and `from_config`;
    `needs_subject`: every fact must name a subject that occurs in its prompt."""

    needs_subject = False

    @classmethod
    def from_config(cls, model, tokenizer, modules: dict, config, system=None, state=None):
        """The editor for `config` (its method's dataclass); `state`: the tensors a
        meta-trained checkpoint holds for it (None for methods with nothing learned)."""
        return cls(model, tokenizer, modules, system)

    def __init__(self, model, tokenizer, modules: dict, system: str | None = None):
        self.lm = ChatLM(model, tokenizer, system, first_block(model, modules))
        self.modules = modules
        for p in model.parameters():
            p.requires_grad_(False)
        self.master = {n: weight_kv(m).detach().float().clone() for n, m in modules.items()}
        # what a method keeps per applied batch besides its shift (MALMEN: K^T K, K^T D,
        # rows; AlphaEdit: K^T K), only with `keep_stats`, which `Editor.edit` sets (its
        # history is what uses them): `stats` of the last compute_shifts; `applied`, those
        # of the batches applied before it
        self.stats: dict[str, torch.Tensor] = {}
        self.applied: list[dict[str, torch.Tensor]] = []
        self.keep_stats = False

    # the loaded model's parts (`self.lm`), as every method reads them
    model = property(lambda self: self.lm.model)
    tokenizer = property(lambda self: self.lm.tokenizer)
    system = property(lambda self: self.lm.system)
    first = property(lambda self: self.lm.first)

    def compute_shifts(self, batch, lap=_no_lap) -> dict[str, torch.Tensor]:
        """{module name: S (d_k x d_v)} for all facts of the batch at once; leaves the
        weights unchanged. The batch may carry cached hidden states (editor.lm). `lap(stage)`
        is called at the end of each stage (`evaluation.speed.Laps` times them)."""
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

    @contextmanager
    def kept_weights(self):
        """Inside, the edited modules may be written; on exit they hold what they held on
        entry (yields those weights, fp32)."""
        start = {n: weight_kv(m).detach().float().clone() for n, m in self.modules.items()}
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


class NoEditor(BaseEditor):
    """The unedited model through the same pipeline: every shift is zero."""

    def compute_shifts(self, batch, lap=_no_lap):
        return {n: torch.zeros_like(w) for n, w in self.master.items()}


@dataclass
class HyperConfig:
    """Options of the hypernetwork editors (MALMEN, MEND): the network, the solve, the rows."""

    RENAMED = {"lr": "init_step_size", "log_lam": "init_log_lam", "log_mu": "init_log_mu"}
    BEFORE = {"couple": False}  # options added later: what older checkpoints were trained with

    name: str = option("malmen", "the method's label in run folders and results")
    rule: str = option("malmen", "the registered method: malmen or mend")
    rank: int = option(1920, "rank of each residual block of the hypernetwork")
    n_blocks: int = option(2, "residual blocks of the hypernetwork")
    init_step_size: float = option(3e-4, "initial per-layer step size eta (learned)")
    init_log_lam: float = option(0.0, "initial per-layer log lambda of the solve (learned; "
                                 "MALMEN)")
    solve_dtype: str = option("float32", "dtype of the least-squares solve (float32 or "
                              "float64)", test_time=True)
    hyper_chunk: int = option(1024, "key rows per hypernetwork forward (bounds memory at any N)",
                              test_time=True)
    eot_rows: bool = option(True, "the rows that predict the end-of-turn token enter K and D",
                            test_time=True)
    reg_rows: int | None = option(None, "a number r: lambda and mu are weights per r key rows, "
                                  "scaled by n / r (null: unscaled)", test_time=True)
    prior: bool = option(True, "key prior C (second moment of the edited modules' keys on the "
                         "locality answers) in the solve: (K^T K + lam I + mu C) S = K^T D")
    init_log_mu: float = option(4.0, "initial per-layer log mu, the prior's weight (learned)")
    step_scale: float = option(1.0, "test-time multiplier of the learned step size "
                               "(meta-training uses 1)", test_time=True)
    couple: bool = option(True, "MALMEN: the edited modules of one shape share one solve, "
                          "sum_l K_l S_l = sum_l D_l (rank up to L d_k, not d_k: for more key "
                          "rows than one module's d_k); false: one solve per module",
                          test_time=True)
    joint: bool = option(True, "MALMEN, editing on top of earlier edits: re-solve jointly with "
                         "the earlier batches' statistics (K^T K, K^T D, rows; captured on "
                         "the unedited weights), as if all were edited at once; false: stack "
                         "each batch's own shift, captured on the edited model",
                         test_time=True)


@dataclass
class MalmenConfig(HyperConfig):
    """MALMEN: value shifts per token, least squares across all edits (the defaults)."""


@dataclass
class MendConfig(HyperConfig):
    """MEND: the same pipeline and network; S = -eta sum_j u~_j delta~_j^T (no solve)."""

    name: str = option("mend", "the method's label in run folders and results")
    rule: str = option("mend", "the registered method: malmen or mend")
    init_step_size: float = option(3e-6, "initial per-layer step size eta (learned); "
                                   "untrained, on 128 facts: 1e-6 ES 0.21 LS 0.92, 3e-6 ES "
                                   "0.25 LS 0.76, 1e-5 ES 0.28 LS 0.32")
    prior: bool = option(False, "MEND has no solve, so no key prior")
    couple: bool = option(False, "MEND has no solve, so nothing to couple", test_time=True)


def build_hypernet(modules: dict, config: HyperConfig) -> HyperNetwork:
    prior = {"prior": True, "log_mu": config.init_log_mu} if config.prior else {}
    return HyperNetwork({n: kv_shape(m) for n, m in modules.items()}, rule=config.rule,
                        couple=config.couple,
                        rank=config.rank, n_blocks=config.n_blocks, lr=config.init_step_size,
                        log_lam=config.init_log_lam, reg_rows=config.reg_rows, **prior)


class HyperEditor(BaseEditor):
    """MALMEN or MEND (the hypernetwork's `rule`).

    chunk_size: facts per capture forward/backward; hyper_chunk: key rows per hypernetwork
    forward (memory stays bounded at any number of facts); eot_rows: whether the rows that
    predict the end-of-turn token enter K and D; step_scale: a test-time multiplier of the
    shift (MALMEN's S is linear in D, so this scales the learned step size eta)."""

    def __init__(self, model, tokenizer, modules, hypernet: HyperNetwork, system=None,
                 solve_dtype=torch.float32, chunk_size: int = 128, hyper_chunk: int = 4096,
                 eot_rows: bool = True, step_scale: float = 1.0, joint: bool = True):
        super().__init__(model, tokenizer, modules, system)
        self.hypernet, self.solve_dtype, self.chunk_size = hypernet, solve_dtype, chunk_size
        self.hyper_chunk, self.eot_rows, self.step_scale = hyper_chunk, eot_rows, step_scale
        self.joint = joint and hypernet.solves
        self._held = {}  # coupled joint solves: group -> (its batches' keys, CoupledRunning)

    @classmethod
    def from_config(cls, model, tokenizer, modules, config: HyperConfig, system=None,
                    state=None) -> HyperEditor:
        """A fresh hypernetwork for `config` (meta-training starts from it), or with
        `state` (a checkpoint's hypernetwork tensors) the trained one; errors name what
        does not fit."""
        if config.solve_dtype not in DTYPES:
            raise ValueError(f"solve_dtype must be one of {sorted(DTYPES)}, got "
                             f"{config.solve_dtype!r}")
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
        hypernet.reg_rows = config.reg_rows  # checked: a positive number of rows or None
        hypernet.couple = config.couple
        hypernet.to(next(model.parameters()).device)
        return cls(model, tokenizer, modules, hypernet, system,
                   solve_dtype=DTYPES[config.solve_dtype], hyper_chunk=config.hyper_chunk,
                   eot_rows=config.eot_rows, step_scale=config.step_scale, joint=config.joint)

    def capture(self, batch):
        """Keys and value gradients of all facts, captured `chunk_size` facts at a time."""
        parts = [capture(self.model, self.modules, b, self.first, eot_rows=self.eot_rows)[0]
                 for b in row_chunks(batch, self.chunk_size)]
        return {n: (torch.cat([p[n][0] for p in parts]), torch.cat([p[n][1] for p in parts]))
                for n in self.modules}

    def compute_shifts(self, batch, lap=_no_lap, captured=None):
        """The batch's shifts. Jointly (`joint`, with batches applied before: `applied`):
        keys and value gradients captured on the unedited weights, and the shift that takes
        the earlier batches' joint solve S(prev) to the joint solve of all, S(prev + this)
        (so the weights, master + the sum of the batches' shifts, equal one edit of every
        fact to float tolerance); `stats` keeps this batch's statistics (with `keep_stats`):
        per module K^T K, K^T D and the rows, or with `couple` each module's keys and each
        group's summed D (the coupled solve needs the rows themselves)."""
        hn = self.hypernet
        keep = self.joint and self.keep_stats
        joint = keep and bool(self.applied)
        kind = "keys" if hn.couple else "ktk"
        if joint and not all(f"{n}:{kind}" in b for b in self.applied for n in self.modules):
            warnings.warn("an earlier batch has no statistics of this solve (edited with "
                          "joint=false, saved without them, or with couple set otherwise): "
                          "this batch is stacked, not solved jointly", stacklevel=3)
            joint = False
        if captured is None:
            with self.unedited() if joint else nullcontext():
                captured = self.capture(batch)
            lap("capture")
        self.stats = {}
        with torch.no_grad():
            if not keep:
                shifts = hn.shifts(captured, self.solve_dtype, self.hyper_chunk, lap=lap)
            elif hn.couple:
                shifts = self.coupled_joint(captured, joint, lap)
            else:
                shifts = self.module_joint(captured, joint, lap)
        return {n: self.step_scale * s for n, s in shifts.items()}

    def module_joint(self, captured, joint: bool, lap) -> dict[str, torch.Tensor]:
        """Per-module solves from K^T K, K^T D and the rows (summed with `applied`'s)."""
        hn, shifts = self.hypernet, {}
        for name, (k, d) in captured.items():
            values = hn.values(name, k, d, self.hyper_chunk)
            lap("hypernetwork")
            stats = hn.statistics(k, values)
            self.stats.update({f"{name}:{p}": t.cpu() for p, t in stats.items()})
            if joint:
                prev = summed(self.applied, name)
                new = {p: prev[p] + stats[p].to(prev[p]) for p in prev}
                shifts[name] = hn.solve_statistics(name, to(new, k), self.solve_dtype) \
                    - hn.solve_statistics(name, to(prev, k), self.solve_dtype)
            else:  # the first batch: its own solve, as for any single edit
                shifts[name] = hn.solve_values(name, k, values, self.solve_dtype)
            lap("solve")
        return shifts

    def coupled_joint(self, captured, joint: bool, lap) -> dict[str, torch.Tensor]:
        """Coupled solves (`HyperNetwork.couple`) over this batch's rows and, jointly, the
        rows of the batches in `applied` (their keys and summed D, kept in order). The solve
        of the rows so far is kept (`held`), so a batch in turn costs its own rows' update of
        it (`coupled_add`), not a solve of every row edited so far; rebuilt from the
        statistics after a rollback or a load."""
        hn, shifts = self.hypernet, {}
        for group in hn.groups(captured):
            keys = [captured[n][0] for n in group]
            values = hn.coupled_values(group, captured, self.hyper_chunk)
            lap("hypernetwork")
            self.stats.update({f"{n}:keys": k.float().cpu() for n, k in zip(group, keys)})
            self.stats.update({f"{n}:rows": torch.tensor([k.shape[0]], dtype=torch.float64)
                               for n, k in zip(group, keys)})
            self.stats[f"{group[0]}:values"] = values.float().cpu()
            applied = [b[f"{group[0]}:keys"] for b in self.applied] if joint else []
            if not applied:  # the first batch: its own solve, as for any single edit
                run = hn.start_coupled(group, keys, values, self.solve_dtype)
                new = run.shifts
            elif hn.reg_rows:  # lambda and mu change with the rows: solve all again
                prev = self.kept(group, keys, values)
                run = hn.start_coupled(group, [torch.cat(p) for p in zip(prev[0], keys)],
                                       torch.cat([prev[1], values]), self.solve_dtype)
                old = hn.start_coupled(group, *prev, self.solve_dtype).shifts
                new = [a - b.to(a) for a, b in zip(run.shifts, old)]
            else:
                run, new = coupled_add(self.held(group, applied, keys, values), keys, values)
            self._held[group[0]] = (applied + [self.stats[f"{group[0]}:keys"]], run)
            shifts.update(zip(group, [s.to(values.dtype) for s in new]))
            lap("solve")
        return shifts

    def kept(self, group, keys, values):
        """([K_l], D) of the batches in `applied`, on the device and dtype of this batch's."""
        def part(name, kind, like):
            return torch.cat([b[f"{name}:{kind}"] for b in self.applied]).to(like)
        return [part(n, "keys", k) for n, k in zip(group, keys)], part(group[0], "values", values)

    def held(self, group, applied: list, keys, values) -> CoupledRunning:
        """The coupled solve over the rows of `applied`: the one kept by the last edit when
        it covered exactly these batches, else solved again from their statistics. Taken
        out of `_held` (`coupled_add` may update it in place): an edit that fails leaves
        nothing stale behind."""
        rows, run = self._held.pop(group[0], ([], None))
        if len(rows) == len(applied) and all(a is b for a, b in zip(rows, applied)):
            return run
        return self.hypernet.start_coupled(group, *self.kept(group, keys, values),
                                           self.solve_dtype)


def summed(batches: list[dict], name: str) -> dict[str, torch.Tensor]:
    """Module `name`'s statistics summed over `batches` in order (`HyperEditor.stats`)."""
    out = {}
    for stats in batches:
        for part in ("ktk", "ktd", "rows"):
            t = stats[f"{name}:{part}"]
            out[part] = t.clone() if part not in out else out[part] + t
    return out


def to(stats: dict, like: torch.Tensor) -> dict:
    return {p: t.to(like.device) if p == "rows" else t.to(like) for p, t in stats.items()}


@dataclass
class FTConfig:
    name: str = option("ft", "the method's label in run folders and results")
    rule: str = option("ft", "the registered method")
    steps: int = option(20, "Adam steps on the edited modules")
    lr: float = option(1e-2, "Adam's learning rate (zsRE validation, N = 128: 1e-4 ES 0.32 "
                       "LS 0.68, 1e-3 ES 0.72 LS 0.46, 1e-2 ES 0.98 LS 0.19)")
    chunk_size: int = option(128, "facts per forward/backward; their gradients add up to the "
                             "full batch's, so memory is bounded at any N")


class FTEditor(BaseEditor):
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

    def compute_shifts(self, batch, lap=_no_lap):
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
                shifts = {n: weight_kv(m).detach().float() - start[n]
                          for n, m in self.modules.items()}
            finally:
                for w in weights:
                    w.requires_grad_(False)
                    w.grad = None
        lap("fine-tune")
        return shifts
