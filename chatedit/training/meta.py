"""Meta-training of the hypernetwork editor (MALMEN and MEND share this loop).

One step, for m training facts (the LM graph and the hypernetwork graph never coexist):
1. capture keys K and value gradients Delta of the facts' fine-tuning loss (with the cache,
   captured once for every training fact: they depend on the unedited model only);
2. without grad: S = shift rule(K, Delta); apply W <- W + S;
3. meta-loss = CE(targets | rephrases) + sum_s c_s KL_s(before || after) over the locality
   sources s; its backward gives G = dL/dW for each edited module; restore W;
4. re-run the shift rule with grad and backprop the proxy sum <G, S(theta)> (exact: for
   MALMEN the solve's backward is analytic, hypernet/solve.py); clip; Adam step.

Memory is bounded at any m: the meta-loss runs `train.lm_chunk` rows at a time (each part
a token mean, so the chunks' backwards sum to the whole loss's), and the hypernetwork
`editor.hyper_chunk` key rows at a time (`HyperNetwork.backward`). `train.n_edits` is a
number or a list to draw m from at each step (seeded by the step, so a resumed run draws
the same), and never more than the training pool holds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from hypernet.solve import row_space_bytes

from .. import checkpoint
from ..chat import IGNORE, encode_pair, fact_row, sliced
from ..editors import HyperMethod
from ..evaluation.metrics import edit_metrics
from ..evaluation.panel import Probes, nested, panel_rows
from ..extras import require
from ..lm import forward, kl_before_after, logits_before, padded, stack_captured, wide
from ..models import kv_shape, to_kv
from ..prompts import base_responses, conversation_rows, subject_rows
from ..text import key


@dataclass
class TrainData:
    """Encoded (and, with the cache, hidden-state-carrying) rows for meta-training: per
    training fact i, edit[i] is prompt -> target and rephrase[i] its rephrase -> target."""

    edit: list[dict]
    rephrase: list[dict]
    nq: list[dict | None]
    subject: list[dict | None] = field(default_factory=list)     # aligned with edit, or empty
    pools: dict[str, list[dict]] = field(default_factory=dict)  # instruction, harmful
    val: dict[str, list] = field(default_factory=dict)  # aligned panel_rows
    keys: list[set] = field(default_factory=list)  # per fact: its normalised prompts
    priors: dict[str, torch.Tensor] = field(default_factory=dict)  # key priors C, if any


# Locality conversations for meta-training, one loss coefficient per source (conf/locality):
#
# - nq: the facts' unrelated questions (zsRE's NQ questions) with their dataset answers;
# - instruction: self-instruct prompts answered by the base model's own greedy responses;
# - harmful: hh-rlhf harmful requests answered by the base model's own greedy responses
#   (these two: `chatedit.prompts.SOURCES` and `base_responses`);
# - subject (`chatedit.prompts.subject_rows`): per fact, another fact's question asked
#   about this fact's subject (the same subject in another relation), answered by the
#   base model's own greedy response.
# The responses are generated once per base model and cached on disk (JSON, atomic write).
# The locality loss is KL(p_before || p_after) over the assistant tokens (`meta_backward`).
# A new source is a prompt loader in `chatedit.prompts.SOURCES` plus its coefficient in
# conf/locality/*.yaml and `POOLS` here.
PER_FACT, POOLS = ("nq", "subject"), ("instruction", "harmful")


def sizes(n_edits) -> list[int]:
    """`train.n_edits` (a number or a list of numbers) as a list."""
    values = list(n_edits) if OmegaConf.is_list(n_edits) or isinstance(n_edits, list | tuple) \
        else [n_edits]
    if not values or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"train.n_edits must be a positive number or a list of them, got "
                         f"{n_edits!r}")
    return values


def label_count(rows) -> int:
    return sum(sum(y != IGNORE for y in r["labels"][1:]) for r in rows)


class MetaTrainer:
    def __init__(self, editor: HyperMethod, data: TrainData, cfg, loc_cfg, seed: int = 0,
                 all_logits: bool = False):
        """`all_logits`: the meta-loss computes logits at every position (for benchmarks;
        `lm.forward`)."""
        self.editor, self.data, self.cfg, self.loc, self.seed = editor, data, cfg, loc_cfg, seed
        self.all_logits = all_logits
        self.hypernet = editor.hypernet
        self.sizes = sizes(cfg.n_edits)
        if not data.keys:
            data.keys = [set() for _ in data.edit]
        check_pool(cfg.n_edits, data.keys)
        # the per-layer log step sizes, log lambdas (and log mus) get their own learning rate
        is_scalar = {True: [], False: []}
        for name, p in self.hypernet.named_parameters():
            is_scalar[name.endswith(("log_lr", "log_lam", "log_mu"))].append(p)
        self.opt = torch.optim.Adam([{"params": is_scalar[False], "lr": cfg.meta_lr},
                                     {"params": is_scalar[True], "lr": cfg.scalar_lr}])
        self.step_count, self.history, self.probes = 0, [], None
        self.coefs = {s: float(loc_cfg.get(f"{s}_coef", 0)) for s in PER_FACT + POOLS
                      if float(loc_cfg.get(f"{s}_coef", 0)) > 0}

    # ------------------------------------------------------------- batches
    def n_edits(self, step: int) -> int:
        """Facts edited at once at `step`: `train.n_edits`, or a seeded draw from its list."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        return self.sizes[int(torch.randint(len(self.sizes), (1,), generator=g))]

    def fact_indices(self, step: int) -> list[int]:
        """Facts of a step: the next m of a stream of epoch-wise seeded permutations (so a
        resumed run sees the same), skipping a fact whose prompt or rephrase is already in
        the step."""
        n, m = len(self.data.edit), self.n_edits(step)
        epoch, offset = divmod(sum(self.n_edits(s) for s in range(step)), n)
        out, seen = [], set()
        for e in range(epoch, epoch + 3):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + e))
            for i in perm[offset if e == epoch else 0:].tolist():
                if not self.data.keys[i] & seen:
                    out.append(i)
                    seen |= self.data.keys[i]
                    if len(out) == m:
                        return out
        raise RuntimeError(f"could not draw {m} facts with distinct prompts")  # capacity()

    def loc_rows(self, step: int, idx: list[int]) -> dict[str, list[dict]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + step)
        rows = {}
        for source in PER_FACT:  # the step's own facts
            if source in self.coefs:
                per_fact = getattr(self.data, source)
                rows[source] = [per_fact[i] for i in idx if per_fact[i] is not None]
        for source in POOLS:  # random draws
            if source in self.coefs:
                pool = self.data.pools[source]
                pick = torch.randperm(len(pool), generator=g)[: self.loc[f"n_{source}"]]
                rows[source] = [pool[i] for i in pick.tolist()]
        return rows

    def batch(self, rows):
        return padded(self.editor.model, self.editor.tokenizer, rows)

    def chunks(self, rows):
        """Padded batches of at most `train.lm_chunk` rows, sorted by length."""
        size = int(self.cfg.get("lm_chunk") or len(rows))
        rows = sorted(rows, key=lambda r: len(r["input_ids"]))
        return [self.batch(rows[i:i + size]) for i in range(0, len(rows), size)]

    # ---------------------------------------------------------------- step
    def meta_backward(self, parts: dict[str, tuple[list[dict], float, str]]) -> dict:
        """Backward of sum_p coef_p * loss_p over the edited model, where loss_p is the token
        mean of cross-entropy ("ce") or KL(before || after) ("kl") over rows_p, run chunk by
        chunk; returns each part's loss (token mean)."""
        ed = self.editor
        out = {}
        for name, (rows, coef, kind) in parts.items():
            n_tok, total = label_count(rows), 0.0
            for batch in self.chunks(rows):
                logits, labels, _ = forward(ed.model, batch, ed.first, self.all_logits)
                if kind == "ce":
                    loss = F.cross_entropy(logits, labels, reduction="sum")
                else:
                    loss = kl_before_after(logits_before(ed.model, batch, ed.first), logits,
                                           reduction="sum")
                (coef * loss / n_tok).backward()
                total += loss.item()
            out[name] = total / n_tok
        return out

    def step(self) -> dict:
        ed, cfg, hn = self.editor, self.cfg, self.hypernet
        m = self.n_edits(self.step_count)
        idx = self.fact_indices(self.step_count)
        edit_rows = [self.data.edit[i] for i in idx]
        gen_rows = [self.data.rephrase[i] for i in idx]
        locs = {s: r for s, r in self.loc_rows(self.step_count, idx).items() if r}

        # 1. capture (and update the running normalisers: training only)
        if "captured" in edit_rows[0]:
            captured, edit_loss = stack_captured(edit_rows, next(ed.model.parameters()).device)
        else:
            captured = ed.capture(self.batch(list(edit_rows)))
            edit_loss = torch.tensor(float("nan"))
            # the unedited model's side of the KL
            locs = {s: ed.lm.with_final(r, len(r)) for s, r in locs.items()}
        for name, (k, d) in captured.items():
            hn.update_norm(name, k, d)
        # 2. shifts without grad, applied
        factors = {}
        ed.apply(hn.shifts(captured, ed.hyper_chunk, factors))
        # 3. meta-loss on the edited model; G = dL/dW
        parts = {"rephrase_loss": (list(gen_rows), cfg.rephrase_coef, "ce")}
        parts.update({f"loc_{s}": (r, self.coefs[s], "kl") for s, r in locs.items()})
        if cfg.edit_coef > 0:  # the edit prompts themselves, after the edit
            parts["edit_after"] = (edit_rows, cfg.edit_coef, "ce")
        weights = [mod.weight for mod in ed.modules.values()]
        for w in weights:
            w.requires_grad_(True)
        try:
            losses = self.meta_backward(parts)
            grads = {n: wide(to_kv(mod, mod.weight.grad)) for n, mod in ed.modules.items()}
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
            ed.restore()
        # 4. hypernetwork update through the proxy <G, S(theta)>, chunk by chunk
        self.opt.zero_grad()
        hn.backward(captured, grads, ed.hyper_chunk, factors)
        norm = torch.nn.utils.clip_grad_norm_(hn.parameters(), cfg.max_grad_norm)
        self.opt.step()
        self.step_count += 1
        n_tok = sum(k.shape[0] for k, _ in captured.values()) / len(captured)
        total = sum(parts[p][1] * v for p, v in losses.items())
        out = {"step": self.step_count, "n_edits": m, "key_rows": int(n_tok),
               "edit_loss": edit_loss.item() / n_tok, "grad_norm": norm.item(), "total": total,
               **{p: v for p, v in losses.items() if p != "edit_after"}}
        if hn.has_prior:  # the learned weight of the key prior, mean over layers
            log_mu = torch.cat([n.log_mu for n in hn.nets.values()])
            out["mu"] = log_mu.exp().mean().item()
        return out

    def validate(self) -> dict:
        """Edit metrics and the locality panel of the validation facts at each N of
        `train.val_ns` (the first N's keys plain, the others' prefixed with N: ES, 1024_ES,
        ...)."""
        ed = self.editor
        if self.probes is None:  # the unedited model's answers to the validation probes
            self.probes = Probes(ed.model, ed.tokenizer, "validation", ed.lm.system)
        return validation_metrics(ed, self.data.val, self.cfg.get("val_ns"), self.probes)

    # ---------------------------------------------------------- checkpoints
    def save(self, path, meta: dict) -> None:
        opt_tensors, groups = checkpoint.optimizer_tensors(self.opt)
        tensors = {**checkpoint.prefixed(self.hypernet.state_dict(), "hypernet."),
                   **checkpoint.prefixed(opt_tensors, "optim.")}
        checkpoint.save(path, tensors, {**meta, "step": self.step_count, "history": self.history,
                                        "optim_groups": groups})

    def load(self, path) -> dict:
        tensors, meta = checkpoint.load(path)
        self.hypernet.load_state_dict(checkpoint.unprefixed(tensors, "hypernet."))
        checkpoint.load_optimizer(self.opt, checkpoint.unprefixed(tensors, "optim."),
                                  meta["optim_groups"])
        self.step_count, self.history = meta["step"], meta["history"]
        return meta


def validation_metrics(editor, val: dict, ns=None, probes=None) -> dict:
    """Edit metrics and the locality panel (`probes`: the model-level part) of the first N
    aligned validation facts (`panel_rows`) at each N of `ns` (default: all); the first N's
    keys plain, the others' prefixed with N (ES, 1024_ES, ...)."""
    out = {}
    for i, n in enumerate(ns or [len(val["edit"])]):
        metrics = edit_metrics(editor, sliced(val, n), probes=probes)
        out.update({(k if i == 0 else f"{n}_{k}"): v for k, v in metrics.items()})
    return out


def prepare_data(editor, train_facts, val_facts, loc_cfg, use_cache: bool, batch_size: int,
                 system=None) -> TrainData:
    """Encode every training/validation/locality row (no locality pools when `loc_cfg` is
    None); with `use_cache`, attach the hidden state entering the first edited block and,
    to the edit rows, their captured keys and value gradients, and to the locality rows, the
    unedited model's last hidden state at their label positions (all computed once here)."""
    tok, model = editor.tokenizer, editor.model
    facts = [f for f in train_facts if f["rephrases"]]  # so edit and rephrase rows align
    data = TrainData(
        edit=[encode_pair(tok, f["prompt"], f["target"], system) for f in facts],
        rephrase=[encode_pair(tok, f["rephrases"][0], f["target"], system) for f in facts],
        nq=[fact_row(tok, f, "loc", system) for f in facts],
        val=panel_rows(model, tok, val_facts, system),
        keys=fact_keys(facts))
    for source in POOLS:
        if loc_cfg is not None and float(loc_cfg[f"{source}_coef"]) > 0:
            pairs = base_responses(model, tok, source, loc_cfg.pool_size, loc_cfg.response_tokens,
                                   loc_cfg.max_prompt_chars, system)
            data.pools[source] = conversation_rows(tok, pairs, system)
    if loc_cfg is not None and float(loc_cfg.get("subject_coef", 0)) > 0:
        data.subject = subject_rows(model, tok, facts, loc_cfg.subject_tokens, system)
    if use_cache:
        def cached(rs):
            return editor.lm.with_hidden(rs, batch_size, progress=True)

        def final(rs):
            return editor.lm.with_final(rs, batch_size, progress=True)

        def captured(rs):
            return editor.lm.with_capture(cached(rs), editor.modules, batch_size, progress=True)

        data.edit = captured(data.edit)
        data.rephrase = cached(data.rephrase)
        data.nq = final(cached(data.nq))
        data.subject = final(cached(data.subject)) if data.subject else []
        data.pools = {s: final(cached(r)) for s, r in data.pools.items()}
        data.val = {k: nested(cached, r) for k, r in data.val.items()}
    if loc_cfg is not None and editor.hypernet.has_prior:  # keys of the unrelated answers
        loc_rows = [r for r in data.nq + data.subject if r is not None]
        loc_rows += sum(data.pools.values(), [])
        data.priors = editor.lm.key_moments(loc_rows, editor.modules, batch_size,
                                            progress=True)
        for name, c in data.priors.items():
            editor.hypernet.set_prior(name, c)
    return data


def save_data(path, data: TrainData, spec: str) -> None:
    """`data` as one safetensors file (atomic), marked with `spec` (what it was prepared
    from), so a killed run resumes without preparing again (`load_data`)."""
    tensors = {}
    packed = checkpoint.pack({f.name: getattr(data, f.name) for f in fields(data)}, tensors)
    checkpoint.save(path, tensors, {"spec": spec, "data": packed})


def load_data(path, spec: str, editor) -> TrainData | None:
    """The data `save_data` wrote, if prepared from the same `spec` (None otherwise); the
    key priors go into `editor`'s hypernetwork as `prepare_data` puts them."""
    _, meta = checkpoint.load(path, with_tensors=False)
    if meta.get("spec") != spec:
        return None
    tensors, meta = checkpoint.load(path)
    data = TrainData(**checkpoint.unpack(meta["data"], tensors))
    for name, c in data.priors.items():
        editor.hypernet.set_prior(name, c)
    return data


def train(trainer: MetaTrainer, steps: int, out_dir: Path, val_every: int, ckpt_every: int,
          meta: dict, log=None) -> dict:
    """Run until `steps`, validating and checkpointing; returns the final metrics."""
    ckpt = out_dir / "checkpoint.safetensors"
    times = []
    if trainer.step_count == 0 and not trainer.history:  # the untrained editor, for reference
        record = {"step": 0, **{f"val_{k}": v for k, v in trainer.validate().items()}}
        trainer.history.append(record)
        if log is not None:
            log(record)
    bar = tqdm(total=steps, initial=trainer.step_count, desc="meta-train")
    while trainer.step_count < steps:
        start = time.perf_counter()
        record = trainer.step()
        times.append(time.perf_counter() - start)
        record["seconds"] = times[-1]
        if trainer.step_count % val_every == 0 or trainer.step_count == steps:
            record.update({f"val_{k}": v for k, v in trainer.validate().items()})
        trainer.history.append(record)
        if log is not None:
            log(record)
        bar.update(1)
        shown = ("rephrase_loss", "loc_instruction", "val_ES", "val_GS", "val_LS_subject",
                 "val_LS_NQ")
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in shown})
        if trainer.step_count % ckpt_every == 0 or trainer.step_count == steps:
            trainer.save(ckpt, meta)
    bar.close()
    last_val = next((r for r in reversed(trainer.history) if "val_ES" in r), {})
    return {"steps": trainer.step_count,
            "seconds_per_step": (sum(times) / len(times)) if times else math.nan,
            **{k: v for k, v in last_val.items() if k.startswith("val_")}}


def memory_estimate(model, modules: dict, hypernet, cached_rows: int, tokens_per_row: int = 64,
                    training: bool = True, n_edits: int = 0, key_rows_per_fact: int = 8,
                    captured_rows: int = 0) -> dict[str, float]:
    """A GiB estimate of a run's memory: model weights (device), the fp32 master of the edited
    modules, the hypernetwork (with Adam state and gradients when training), its buffers (key
    priors, running normalisers), the hidden-state cache (host memory; rows x tokens x
    hidden x fp32), the captured keys and value gradients of the cached edit rows, one edit
    batch of `n_edits` facts (their keys, value gradients and value shifts at every edited
    module) and its solve (float64: the row-space matrix and the keys' projections)."""
    gib = 2 ** 30
    n_hyper = sum(p.numel() for p in hypernet.parameters()) if hypernet is not None else 0
    buffers = sum(b.numel() * b.element_size() for b in hypernet.buffers()) \
        if hypernet is not None else 0
    row = sum(sum(kv_shape(m)) for m in modules.values()) * 4  # one key row at every module
    rows = n_edits * key_rows_per_fact
    est = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()) / gib,
        "fp32 master": sum(m.weight.numel() * 4 for m in modules.values()) / gib,
        "hypernetwork": n_hyper * 4 * (4 if training else 1) / gib,
        "hypernetwork buffers": buffers / gib,
        "solve": row_space_bytes(rows, [kv_shape(m)[0] for m in modules.values()]) / gib
        if hypernet is not None else 0.0,
        "hidden cache (host)": cached_rows * tokens_per_row * model.config.hidden_size * 4 / gib,
        "captured cache (host)": captured_rows * key_rows_per_fact * row / gib,
        "edit batch": n_edits * key_rows_per_fact * row * 3 / gib,
    }
    est["total"] = sum(est.values())
    return est


def check_config(cfg) -> None:
    """The ranges of `train.*` (and the editor's chunk), checked before any work; errors name
    the key and what it allows."""
    def need(name, ok, allowed):
        value = OmegaConf.select(cfg, name) if OmegaConf.is_config(cfg) else None
        if not ok(value):
            raise ValueError(f"{name} must be {allowed}, got {value!r}")

    def integer(lo):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def number(lo, hi=math.inf, strict=False):
        return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and (
            lo < v if strict else lo <= v) and v <= hi

    sizes(cfg.train.n_edits)
    for name in ("steps", "val_every", "ckpt_every", "batch_size", "lm_chunk", "answer_tokens"):
        need(f"train.{name}", integer(1), "an integer >= 1")
    for name in ("test_facts", "test_gen"):
        need(f"train.{name}", integer(0), "an integer >= 0")
    for name in ("meta_lr", "max_grad_norm"):
        need(f"train.{name}", number(0, strict=True), "a number > 0")
    for name in ("scalar_lr", "rephrase_coef", "edit_coef"):
        need(f"train.{name}", number(0), "a number >= 0")
    need("train.train_facts", lambda v: v is None or integer(1)(v), "null or an integer >= 1")
    need("train.val_ns", lambda v: v is None or (len(v) > 0 and all(map(integer(1), v))),
         "null or a list of integers >= 1")
    if "hyper_chunk" in cfg.editor:
        need("editor.hyper_chunk", integer(1), "an integer >= 1")
    if OmegaConf.select(cfg, "wandb.enabled"):
        require("wandb", "wandb.enabled=true")


def fact_keys(facts) -> list[set]:
    """Per training fact (with a rephrase), its normalised prompt and rephrase."""
    return [{key(f["prompt"]), key(f["rephrases"][0])} for f in facts if f["rephrases"]]


def capacity(keys: list[set]) -> int:
    """How many facts one step can hold: facts sharing a prompt never go together."""
    seen, n = set(), 0
    for k in keys:
        if not k & seen:
            seen |= k
            n += 1
    return n


def check_pool(n_edits, keys: list[set]) -> None:
    pool = capacity(keys)
    if max(sizes(n_edits)) > pool:
        raise ValueError(f"train.n_edits={max(sizes(n_edits))} is more facts than the training "
                         f"pool holds ({pool} facts with distinct prompts); use fewer edits "
                         "per step or a larger pool (e.g. data=mixed)")
