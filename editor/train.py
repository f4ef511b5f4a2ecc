"""Meta-training of the hypernetwork editor (MALMEN and MEND share this loop).

One step, for m training facts (the LM graph and the hypernetwork graph never coexist):
1. capture keys K and value gradients Delta of the facts' fine-tuning loss (with the cache,
   captured once for every training fact: they depend on the unedited model only);
2. without grad: S = shift rule(K, Delta); apply W <- W + S;
3. meta-loss = CE(targets | rephrases) + sum_s c_s KL_s(before || after) over the locality
   sources s; its backward gives G = dL/dW for each edited module; restore W;
4. re-run the shift rule with grad and backprop the proxy sum <G, S(theta)> (exact: for
   MALMEN the solve's backward is analytic, hypernet/solve.py); clip; Adam step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypernet import HyperNetwork

from . import checkpoint
from .editors import HyperEditor
from .lm import (capture, forward, key_moments, kl_before_after, logits_before, padded,
                 stack_captured, with_capture, with_final, with_hidden)
from .locality import base_responses, conversation_rows, subject_rows
from .metrics import conversations, edit_metrics, fact_row, fact_rows
from .models import kv_shape, to_kv


@dataclass
class TrainData:
    """Encoded (and, with the cache, hidden-state-carrying) rows for meta-training."""

    edit: list[dict]
    rephrase: list[dict]
    nq: list[dict | None]
    subject: list[dict | None] = field(default_factory=list)     # aligned with edit, or empty
    pools: dict[str, list[dict]] = field(default_factory=dict)  # instruction, harmful
    val: dict[str, list[dict]] = field(default_factory=dict)    # edit, rephrase, loc


PER_FACT, POOLS = ("nq", "subject"), ("instruction", "harmful")  # locality sources


class MetaTrainer:
    def __init__(self, editor: HyperEditor, data: TrainData, cfg, loc_cfg, seed: int = 0):
        self.editor, self.data, self.cfg, self.loc, self.seed = editor, data, cfg, loc_cfg, seed
        self.hypernet = editor.hypernet
        # the per-layer log step sizes, log lambdas (and log mus) get their own learning rate
        is_scalar = {True: [], False: []}
        for name, p in self.hypernet.named_parameters():
            is_scalar[name.endswith(("log_lr", "log_lam", "log_mu"))].append(p)
        self.opt = torch.optim.Adam([{"params": is_scalar[False], "lr": cfg.meta_lr},
                                     {"params": is_scalar[True], "lr": cfg.scalar_lr}])
        self.step_count, self.history = 0, []
        self.coefs = {s: float(loc_cfg.get(s, 0)) for s in PER_FACT + POOLS
                      if float(loc_cfg.get(s, 0)) > 0}

    # ------------------------------------------------------------- batches
    def fact_indices(self, step: int) -> list[int]:
        """Facts of a step: epoch-wise seeded permutations, so a resumed run sees the same."""
        n, m = len(self.data.edit), self.cfg.n_edits
        per_epoch = max(n // m, 1)
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return perm[k * m:(k + 1) * m].tolist()

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

    # ---------------------------------------------------------------- step
    def step(self) -> dict:
        ed, first, cfg = self.editor, self.editor.first, self.cfg
        idx = self.fact_indices(self.step_count)
        edit_rows = [self.data.edit[i] for i in idx]
        edit = self.batch(edit_rows)
        gen = self.batch([self.data.rephrase[i] for i in idx])
        locs = {s: self.batch(r) for s, r in self.loc_rows(self.step_count, idx).items() if r}

        # 1. capture (and update the running normalisers: training only)
        if "captured" in edit_rows[0]:
            captured, edit_loss = stack_captured(edit_rows, edit["input_ids"].device)
        else:
            captured, edit_loss = capture(ed.model, ed.modules, edit, first)
        for name, (k, d) in captured.items():
            self.hypernet.update_norm(name, k, d)
        before = {s: logits_before(ed.model, b, first) for s, b in locs.items()}
        # 2. shifts without grad, applied
        ed.apply(ed.compute_shifts(edit, captured))
        # 3. meta-loss on the edited model; G = dL/dW
        weights = [m.weight for m in ed.modules.values()]
        for w in weights:
            w.requires_grad_(True)
        try:
            logits, labels, _ = forward(ed.model, gen, first)
            gen_loss = F.cross_entropy(logits, labels)
            loc_loss = {s: kl_before_after(before[s], forward(ed.model, b, first)[0])
                        for s, b in locs.items()}
            total = cfg.gen_coef * gen_loss + sum(self.coefs[s] * v for s, v in loc_loss.items())
            if cfg.edit_coef > 0:  # the edit prompts themselves, after the edit
                total = total + cfg.edit_coef * F.cross_entropy(*forward(ed.model, edit, first)[:2])
            total.backward()
            grads = {n: to_kv(m, m.weight.grad).float() for n, m in ed.modules.items()}
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
            ed.restore()
        # 4. hypernetwork update through the proxy <G, S(theta)>
        self.opt.zero_grad()
        for name, (k, d) in captured.items():
            (self.hypernet.shift(name, k, d, ed.solve_dtype) * grads[name]).sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(self.hypernet.parameters(), cfg.max_grad_norm)
        self.opt.step()
        self.step_count += 1
        n_tok = sum(k.shape[0] for k, _ in captured.values()) / len(captured)
        out = {"step": self.step_count, "edit_loss": edit_loss.item() / n_tok,
               "gen_loss": gen_loss.item(), "grad_norm": norm.item(), "total": total.item()}
        out.update({f"loc_{s}": v.item() for s, v in loc_loss.items()})
        if self.hypernet.has_prior:  # the learned weight of the key prior, mean over layers
            log_mu = torch.cat([n.log_mu for n in self.hypernet.nets.values()])
            out["mu"] = log_mu.exp().mean().item()
        return out

    def validate(self) -> dict:
        return edit_metrics(self.editor, self.data.val)

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


def build_hypernet(modules: dict, editor_cfg) -> HyperNetwork:
    prior = ({"prior": True, "log_mu": editor_cfg.log_mu} if editor_cfg.get("prior", False)
             else {})
    return HyperNetwork({n: kv_shape(m) for n, m in modules.items()}, rule=editor_cfg.rule,
                        rank=editor_cfg.rank, n_blocks=editor_cfg.n_blocks, lr=editor_cfg.lr,
                        log_lam=editor_cfg.log_lam, **prior)


def prepare_data(editor, train_facts, val_facts, loc_cfg, use_cache: bool, batch_size: int,
                 system=None) -> TrainData:
    """Encode every training/validation/locality row (no locality pools when `loc_cfg` is
    None); with `use_cache`, attach the hidden state entering the first edited block and,
    to the edit rows, their captured keys and value gradients, and to the locality rows, the
    unedited model's last hidden state at their label positions (all computed once here)."""
    tok, model = editor.tokenizer, editor.model
    facts = [f for f in train_facts if f["rephrases"]]  # so edit and rephrase rows align
    data = TrainData(edit=conversations(tok, facts, "edit", system),
                     rephrase=conversations(tok, facts, "rephrase", system),
                     nq=[fact_row(tok, f, "loc", system) for f in facts],
                     val=fact_rows(tok, val_facts, system))
    for source in POOLS:
        if loc_cfg is not None and float(loc_cfg[source]) > 0:
            pairs = base_responses(model, tok, source, loc_cfg.pool_size, loc_cfg.response_tokens,
                                   loc_cfg.max_prompt_chars, system)
            data.pools[source] = conversation_rows(tok, pairs, system)
    if loc_cfg is not None and float(loc_cfg.get("subject", 0)) > 0:
        data.subject = subject_rows(model, tok, facts, loc_cfg.subject_tokens, system)
    if use_cache:
        def cached(rs):
            return with_hidden(model, tok, rs, editor.first, batch_size, progress=True)

        def final(rs):
            return with_final(model, tok, rs, editor.first, batch_size, progress=True)

        data.edit = with_capture(model, tok, cached(data.edit), editor.modules, editor.first,
                                 batch_size, progress=True)
        data.rephrase = cached(data.rephrase)
        data.nq = final(cached(data.nq))
        data.subject = final(cached(data.subject)) if data.subject else []
        data.pools = {s: final(cached(r)) for s, r in data.pools.items()}
        data.val = {k: cached(r) for k, r in data.val.items()}
    if loc_cfg is not None and editor.hypernet.has_prior:  # keys of the unrelated answers
        loc_rows = [r for r in data.nq + data.subject if r is not None]
        loc_rows += sum(data.pools.values(), [])
        moments = key_moments(model, tok, loc_rows, editor.modules, editor.first, batch_size,
                              progress=True)
        for name, c in moments.items():
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
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                         if k in ("gen_loss", "loc_instruction", "val_ES", "val_GS", "val_LS")})
        if trainer.step_count % ckpt_every == 0 or trainer.step_count == steps:
            trainer.save(ckpt, meta)
    bar.close()
    last_val = next((r for r in reversed(trainer.history) if "val_ES" in r), {})
    return {"steps": trainer.step_count,
            "seconds_per_step": (sum(times) / len(times)) if times else math.nan,
            **{k: v for k, v in last_val.items() if k.startswith("val_")}}


def memory_estimate(model, modules: dict, hypernet, cached_rows: int, tokens_per_row: int = 64,
                    training: bool = True) -> dict[str, float]:
    """A GiB estimate of a run's memory: model weights (device), the fp32 master of the edited
    modules, the hypernetwork (with Adam state and gradients when training) and the
    hidden-state cache (host memory; rows x tokens x hidden x fp32)."""
    gib = 2 ** 30
    n_hyper = sum(p.numel() for p in hypernet.parameters()) if hypernet is not None else 0
    est = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()) / gib,
        "fp32 master": sum(m.weight.numel() * 4 for m in modules.values()) / gib,
        "hypernetwork": n_hyper * 4 * (4 if training else 1) / gib,
        "hidden cache (host)": cached_rows * tokens_per_row * model.config.hidden_size * 4 / gib,
    }
    est["total"] = sum(est.values())
    return est


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))
