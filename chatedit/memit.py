"""MEMIT and AlphaEdit: the locate-then-edit methods, closed form, nothing meta-trained.

For a batch of n facts, each with a subject that occurs in its prompt, and the MLP output
projections W_l of blocks l in L = [l_1 < ... < l_T] (keys k = the projection's input):

1. Target values (at the last edited block l_T, at the subject's last token s_i of the
   chat-formatted prompt): z_i = h_i + delta_i, h_i the block's output there, delta_i
   found by Adam on
       NLL(target_i | h_i + delta_i)  +  kl * KL(p(. | s_i) before || after)
       +  wd * ||delta_i|| / ||h_i||^2,          ||delta_i|| <= clamp * ||h_i||
   (MEMIT's KL is on the token after the subject of "{subject} is a"; here it is on the
   token after the subject of the prompt itself, which needs no extra row.)
2. For l = l_1 .. l_T, on the weights edited so far: keys K (n x d_k) at s_i, the residual
   R = z - (block l_T's output at s_i now), spread over the blocks left, and
       MEMIT      S_l = (lam C_l + K^T K)^-1 K^T R / (T - t)
       AlphaEdit  S_l = (P_l (K^T K + K_p^T K_p) + l2 I)^-1 P_l K^T R / (T - t)
   with C_l = E[k k^T] over a text corpus (`key_covariance`: the toolkit's own training
   conversations, never an evaluation prompt; computed once per model and cached) and P_l
   the projector on the span of C_l's eigenvectors whose eigenvalues are below
   `null_threshold` (so S_l leaves the outputs on those keys unchanged); K_p: the keys of
   the batches applied before (AlphaEdit's sequential mode).
   S_l is applied before block l_{t+1}'s keys are read; all weights are back as they were
   when `compute_shifts` returns.

Layers default to MEMIT's band: 5 blocks from 13% of the depth (4-8 of SmolLM2's 30, as
EasyEdit's Llama settings; `locate_edit`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint
from .chat import IGNORE, fact_row, present
from .data import load_facts
from .editors import EditMethod, Shifts, _no_lap
from .files import cache_dir, digest, tensors_digest
from .lm import (PREFIX_MIN, _Stop, block_of, key_moments, last_hidden, prefix_states,
                 row_chunks)
from .methods import conform, option
from .models import blocks, default_edit, set_weight_kv
from .prompts import base_responses, conversation_rows


# the options a target value depends on (with the weights, the last edited block and the row)
VALUE_OPTIONS = ("v_steps", "v_lr", "v_weight_decay", "kl_factor", "clamp_norm", "stop_loss")


def locate_edit(model) -> tuple[str, list[int]]:
    """(module, layers) MEMIT edits by default: the MLP output projection of 5 consecutive
    blocks from 13% of the depth, below the last block (fewer on models too shallow for 5)."""
    module, _ = default_edit(model)
    n = len(blocks(model)[1])
    if n < 2:
        raise ValueError("MEMIT needs at least 2 blocks (one above the edited ones)")
    start = min(round(0.13 * n), n - 2)
    return module, list(range(start, min(start + 5, n - 1)))


@dataclass
class MemitConfig:
    name: str = option("memit", "the method's label in run folders and results")
    rule: str = option("memit", "the registered method")
    mom2_weight: float = option(1000.0, "lambda: weight of the key covariance C (a mean of "
                                "k k^T) against the new keys K^T K")
    v_steps: int = option(25, "Adam steps on each fact's target value delta")
    v_lr: float = option(1.0, "Adam's learning rate for delta")
    v_weight_decay: float = option(1e-3, "weight of ||delta|| / ||h||^2")
    kl_factor: float = option(0.0625, "weight of the KL term at the subject's last token")
    clamp_norm: float = option(4.0, "||delta|| is clamped to this times ||h||")
    stop_loss: float = option(5e-2, "a fact's delta stops changing once its loss is below this")
    chunk: int = option(32, "facts per forward/backward of the target-value search")
    cov_conversations: int = option(160, "conversations per corpus source (self-instruct, "
                                    "hh-rlhf requests with the base model's answers; zsRE "
                                    "training NQ questions) whose keys give C")
    cov_tokens: int = option(40, "greedy tokens per base-model answer in the corpus")


@dataclass
class AlphaEditConfig(MemitConfig):
    name: str = option("alphaedit", "the method's label in run folders and results")
    rule: str = option("alphaedit", "the registered method")
    null_threshold: float = option(2e-2, "eigenvalues of C below this span the null space the "
                                   "update is projected on")
    l2: float = option(1.0, "ridge weight of the projected solve")
    sequential: bool = option(True, "the keys of every applied batch join the preserved set")


def _corpus_rows(model, tokenizer, config: MemitConfig, system) -> list[dict]:
    """Training conversations: self-instruct and hh-rlhf train prompts with the base model's
    greedy answers (cached, shared with the locality losses) and zsRE training NQ pairs."""
    rows = []
    for source in ("instruction", "harmful"):
        pairs = base_responses(model, tokenizer, source, config.cov_conversations,
                               config.cov_tokens, 400, system)
        rows += conversation_rows(tokenizer, pairs, system)
    facts = load_facts("zsre", "train")
    rows += present(fact_row(tokenizer, f, "loc", system)
                    for f in facts.select(range(min(config.cov_conversations, len(facts)))))
    return rows


def weights_digest(model, upto: int) -> str:
    """`tensors_digest` of every parameter the keys of blocks 0..`upto` depend on: all but
    those of the blocks above."""
    prefix, block_list = blocks(model)
    above = tuple(f"{prefix}.{i}." for i in range(upto + 1, len(block_list)))
    return tensors_digest((name, p) for name, p in model.named_parameters()
                          if not name.startswith(above))


def key_covariance(model, tokenizer, modules: dict, config: MemitConfig,
                   system=None) -> tuple[dict[str, torch.Tensor], float | None]:
    """({module: C = E[k k^T]} over every token of the corpus (`_corpus_rows`), the seconds
    it took to compute, None if not recorded), cached as safetensors under a name that
    changes with the weights the keys depend on, the modules and the corpus options (so an
    edited or other model gets its own)."""
    upto = max(block_of(model, n) for n in modules)
    spec = [sorted(modules), config.cov_conversations, config.cov_tokens, system or ""]
    name = digest(weights_digest(model, upto), *spec, size=16)
    path = cache_dir() / "covariance" / f"{name}.safetensors"
    if path.exists():
        tensors, meta = checkpoint.load(path)
        if set(tensors) == set(modules):
            return tensors, meta.get("seconds")
    start = time.perf_counter()
    rows = _corpus_rows(model, tokenizer, config, system)
    cov = key_moments(model, tokenizer, rows, modules, progress=True, every_token=True)
    seconds = time.perf_counter() - start
    checkpoint.save(path, cov, {"modules": sorted(modules), "rows": len(rows),
                                "seconds": seconds})
    return cov, seconds


def null_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U U^T over C's eigenvectors with eigenvalues below `threshold` (float64)."""
    values, vectors = torch.linalg.eigh(cov.double())
    small = vectors[:, values < threshold]
    if small.shape[1] == 0:
        raise ValueError(f"AlphaEdit: no eigenvalue of the key covariance is below "
                         f"null_threshold={threshold} (smallest {values.min().item():.3g}); "
                         "raise it")
    return small @ small.T


class Memit(EditMethod):
    """MEMIT (module docstring); AlphaEdit is the same with another solve (`AlphaEdit`)."""

    config_class = MemitConfig  # what `from_config` reads a method's config as
    needs_subject = True
    keeps_keys = False  # whether each batch's K^T K is kept (`Shifts.stats`)

    def __init__(self, model, tokenizer, modules: dict, config: MemitConfig, system=None):
        super().__init__(model, tokenizer, modules, system)
        self.config = config
        _, self.block_list = blocks(model)
        self.order = sorted(modules, key=lambda n: block_of(model, n))  # lowest block first
        self.last = block_of(model, self.order[-1])
        if self.last == len(self.block_list) - 1:
            raise ValueError(f"{config.name} edits the last block ({self.order[-1]}): the target "
                             "values need blocks above the edited ones; edit lower layers")
        # (the seconds it took, once per model: what a user pays before the first edit)
        self.cov, self.covariance_seconds = key_covariance(model, tokenizer, modules,
                                                           config, system)

    @classmethod
    def from_config(cls, model, tokenizer, modules, config, system=None, state=None):
        return cls(model, tokenizer, modules, conform(config, cls.config_class), system)

    # ------------------------------------------------------------ reading
    def taps(self, batch, pos) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({module: its input at the subject tokens, n x d_k}, block l_T's output there,
        n x d), on the weights as they are now, `config.chunk` facts per forward."""
        size = self.config.chunk
        parts = [self._taps(part, pos[i:i + size]) for i, part in
                 zip(range(0, pos.shape[0], size), row_chunks(batch, size))]
        return ({n: torch.cat([p[0][n] for p in parts]) for n in self.order},
                torch.cat([p[1] for p in parts]))

    @torch.no_grad()
    def _taps(self, batch, pos):
        seen, rows = {}, torch.arange(pos.shape[0], device=pos.device)

        def keep(name):
            def fn(module, inputs, output):
                seen[name] = inputs[0][rows, pos].float()
            return fn

        def stop(module, inputs, output):
            seen["z"] = (output[0] if isinstance(output, tuple) else output)[rows, pos].float()
            raise _Stop

        handles = [self.modules[n].register_forward_hook(keep(n)) for n in self.order]
        handles.append(self.block_list[self.last].register_forward_hook(stop))
        try:
            last_hidden(self.model, batch, self.first)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {n: seen[n] for n in self.order}, seen["z"]

    @torch.no_grad()
    def block_output(self, batch) -> torch.Tensor:
        """Block l_T's output over the whole batch (B x T x d)."""
        seen = {}

        def stop(module, inputs, output):
            seen["h"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        handle = self.block_list[self.last].register_forward_hook(stop)
        try:
            last_hidden(self.model, batch, self.first)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen["h"].float()

    # ------------------------------------------------------ target values
    def values_folder(self) -> Path:
        """Where the target values of the weights as they are now, l_T and the value options
        are kept: one safetensors file per searched chunk, a tensor per row."""
        weights = weights_digest(self.model, len(self.block_list) - 1)
        options = [getattr(self.config, o) for o in VALUE_OPTIONS]
        return cache_dir() / "memit-values" / digest(weights, self.last, options, size=16)

    def target_values(self, batch, pos) -> torch.Tensor:
        """z (n x d): block l_T's output at the subject tokens that makes each target likely
        (step 1 of the module docstring), `config.chunk` facts per forward/backward. Each z
        depends only on its own row, the weights, l_T and the value options, and is kept
        on disk by them (`values_folder`), chunk by chunk as it is searched: MEMIT and
        AlphaEdit on the same model, one fact at N = 128 and again at N = 1000, or a
        stopped evaluation run again, search it once (MEMIT's own code keeps its z too)."""
        folder = self.values_folder()
        known = {}
        for path in sorted(folder.glob("*.safetensors")):
            known.update(checkpoint.load(path)[0])
        mask = batch["attention_mask"].bool()
        keys = [digest(batch["input_ids"][i][mask[i]].tolist(),
                       batch["labels"][i][mask[i]].tolist(), int(pos[i]), size=16)
                for i in range(pos.shape[0])]
        # rows by subject position, so that each chunk's shared positions (`_values`) are many
        lengths = mask.sum(1)
        todo = sorted((i for i, k in enumerate(keys) if k not in known),
                      key=lambda i: (int(pos[i]), int(lengths[i])))
        size = self.config.chunk
        sub = {k: v[todo] for k, v in batch.items()}
        starts = range(0, len(todo), size)
        for start, part in tqdm(zip(starts, row_chunks(sub, size)), total=len(starts),
                                desc=f"values ({len(todo)} facts)", leave=False,
                                delay=5):  # shown after 5 s
            rows = todo[start:start + size]
            z = self._values(part, pos[rows])
            found = {keys[i]: v for i, v in zip(rows, z.cpu())}
            checkpoint.save(folder / f"{digest(sorted(found), size=16)}.safetensors", found,
                            {"rows": len(found)})
            known.update(found)
        return torch.stack([known[k] for k in keys]).to(pos.device)

    def _values(self, batch, pos) -> torch.Tensor:
        """Step 1 for one chunk; a fact whose loss falls below `stop_loss` keeps its delta
        and leaves the forward/backward of the later steps."""
        cfg, model = self.config, self.model
        head = model.get_output_embeddings()
        h0 = self.block_output(batch)
        h_at = h0[torch.arange(pos.shape[0], device=pos.device), pos]
        delta = torch.zeros_like(h_at, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        base = {k: v for k, v in batch.items() if k != "hidden"}
        # the positions before every row's subject token do not depend on delta: the blocks
        # above run them once (their keys and values), then each step runs the rest (o..)
        o = int(pos.min())
        prefix = prefix_states(model, {**base, "hidden": h0}, self.last + 1, o) \
            if o >= PREFIX_MIN else None
        o = o if prefix else 0
        active = torch.ones(pos.shape[0], dtype=torch.bool, device=pos.device)
        kl_before = None
        for _ in range(cfg.v_steps):
            idx = active.nonzero().squeeze(1)
            rows = torch.arange(idx.shape[0], device=pos.device)
            sub = {k: v[idx] for k, v in base.items()}
            labels = sub["labels"][:, o + 1:]  # (the answers follow the subject)
            mask = labels != IGNORE
            kv = [(k[idx], v[idx]) for k, v in prefix] if prefix else None
            with torch.enable_grad():
                h = h0[idx].clone()
                h[rows, pos[idx]] = h[rows, pos[idx]] + delta[idx]
                out = last_hidden(model, {**sub, "hidden": h}, self.last + 1, kv)  # o..
                ce = F.cross_entropy(head(out[:, :-1][mask]).float(), labels[mask],
                                     reduction="none")
                row_of = rows[:, None].expand_as(mask)[mask]
                nll = torch.zeros(idx.shape[0], device=pos.device).index_add(0, row_of, ce)
                nll = nll / mask.sum(1).clamp_min(1)
                log_q = F.log_softmax(head(out[rows, pos[idx] - o]).float(), -1)
                if kl_before is None:  # the first step has delta = 0: the unedited model
                    kl_before = log_q.detach()
                before = kl_before[idx]
                kl = (before.exp() * (before - log_q)).sum(-1)
                decay = delta[idx].norm(dim=1) / h_at[idx].norm(dim=1) ** 2
                loss = nll + cfg.kl_factor * kl + cfg.v_weight_decay * decay
                going = loss.detach() >= cfg.stop_loss
                active[idx[~going]] = False
                if not active.any():
                    break
                opt.zero_grad()
                (loss * going).sum().backward()
            frozen = delta.detach()[~active].clone()
            opt.step()
            with torch.no_grad():
                delta[~active] = frozen  # Adam's momentum must not move a finished fact
                limit = cfg.clamp_norm * h_at.norm(dim=1, keepdim=True)
                norm = delta.norm(dim=1, keepdim=True)
                delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)))
        return (h_at + delta).detach()

    # -------------------------------------------------------------- solve
    def solve(self, name: str, keys: torch.Tensor, resid: torch.Tensor,
              earlier=()) -> torch.Tensor:
        """MEMIT's S = (lam C + K^T K)^-1 K^T R (d_k x d_v), float64."""
        k, r = keys.double(), resid.double()
        a = self.config.mom2_weight * self.cov[name].to(k) + k.T @ k
        return torch.linalg.solve(a, k.T @ r)

    def compute_shifts(self, batch, earlier=(), state=None, lap=_no_lap) -> Shifts:
        pos = batch.get("subject_last")
        if pos is None or bool((pos < 0).any()):
            bad = [] if pos is None else (pos < 0).nonzero().flatten().tolist()
            raise ValueError(f"{self.config.name} needs each fact's subject in its prompt; "
                             f"missing for rows {bad[:10] or 'all'}")
        z = self.target_values(batch, pos)
        lap("values")
        out = self.spread(batch, pos, z, earlier)
        lap("solve")
        return out

    def spread(self, batch, pos, z, earlier=()) -> Shifts:
        """Step 2: the shift of each edited module, lowest block first, each applied before
        the next one's keys are read; the weights are back as they were on return."""
        stats, shifts = {}, {}
        with self.kept_weights() as start:  # back to the weights it started from
            for t, name in enumerate(self.order):
                keys, now = self.taps(batch, pos)
                resid = (z - now) / (len(self.order) - t)
                shifts[name] = self.solve(name, keys[name], resid, earlier).float()
                if self.keeps_keys:  # AlphaEdit's preserved set
                    stats[f"{name}:ktk"] = (keys[name].T @ keys[name]).cpu()
                set_weight_kv(self.modules[name], start[name] + shifts[name].to(start[name]))
        return Shifts(shifts, stats)


class AlphaEdit(Memit):
    """AlphaEdit: MEMIT's target values and residual spread with the null-space projected
    solve; sequentially, the keys of the batches applied before (`earlier`, their K^T K)
    join the preserved set."""

    config_class = AlphaEditConfig

    def __init__(self, model, tokenizer, modules, config: AlphaEditConfig, system=None):
        super().__init__(model, tokenizer, modules, config, system)
        self.projector = {n: null_projector(c, config.null_threshold) for n, c in self.cov.items()}
        self.keeps_keys = config.sequential

    def solve(self, name, keys, resid, earlier=()):
        cfg = self.config
        k, r = keys.double(), resid.double()
        p = self.projector[name].to(k)
        kk = k.T @ k
        if cfg.sequential:
            for stats in earlier:  # batches edited by another method have none
                kk = kk + stats.get(f"{name}:ktk", torch.zeros_like(kk)).to(kk)
        a = p @ kk + cfg.l2 * torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
        return torch.linalg.solve(a, p @ (k.T @ r))
