"""Running the language model for editing: losses only where labels are, the hidden-state
cache, and capture of keys and value gradients at the edited modules.

Speed: blocks below the first edited one never change, so the
hidden state entering that block is computed once per example (`with_hidden`; a batch's
shared prefix, the chat template's system turn, once per batch) and meta-training runs
only the top blocks (`forward` on a batch that carries `hidden`).
Logits are computed only at positions that predict a label, and for locality rows the
unedited model's last hidden state there is cached too (`with_final`), so the "before"
side of the KL is one LM-head product. The keys and value gradients of a training fact
depend on the unedited model only, so meta-training captures them once (`with_capture`).
Everything but the edited
weights has requires_grad=False, and a capture's backward stops at the first edited
module.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .chat import IGNORE, encode_pair, generate, pad
from .models import blocks


@dataclass
class ChatLM:
    """A loaded chat model as the toolkit runs it (lm-eval's `HFLM`): the model, its
    tokenizer, the system prompt every conversation gets, and the first edited block (rows
    may cache the hidden state entering it; None: none is edited, run from the embeddings).
    Its methods are this module's functions with those four filled in."""

    model: Any
    tokenizer: Any
    system: str | None = None
    first: int | None = None

    def encode(self, prompt: str, answer: str, subject: str | None = None,
               max_length: int | None = None) -> dict:
        return encode_pair(self.tokenizer, prompt, answer, self.system, max_length, subject)

    def generate(self, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
                 progress: bool = False, token_ids: bool = False) -> list:
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, batch_size,
                        self.system, progress, token_ids)

    def with_hidden(self, rows, batch_size: int = 32, progress: bool = False):
        return with_hidden(self.model, self.tokenizer, rows, self.first, batch_size, progress)

    def with_final(self, rows, batch_size: int = 32, progress: bool = False):
        return with_final(self.model, self.tokenizer, rows, self.first, batch_size, progress)

    def with_capture(self, rows, modules: dict, batch_size: int = 32, progress: bool = False):
        return with_capture(self.model, self.tokenizer, rows, modules, self.first, batch_size,
                            progress)

    def key_moments(self, rows, modules: dict, batch_size: int = 32, progress: bool = False,
                    every_token: bool = False):
        return key_moments(self.model, self.tokenizer, rows, modules, self.first, batch_size,
                           progress, every_token)

    def predictions(self, rows, batch_size: int = 32, confidence: bool = False):
        return predictions(self.model, self.tokenizer, rows, self.first, batch_size,
                           confidence)

    def answer_nll(self, rows, batch_size: int = 32) -> list:
        return answer_nll(self.model, self.tokenizer, rows, self.first, batch_size)


def padded(model, tokenizer, rows: list[dict], side: str = "right") -> dict:
    """`chat.pad` of encoded rows, moved to the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in pad(tokenizer, rows, side).items()}


def row_chunks(batch: dict, size: int):
    """Sub-batches of at most `size` rows of a right-padded batch, each trimmed to its own
    longest row."""
    n = batch["input_ids"].shape[0]
    for i in range(0, n, size):
        part = {k: v[i:i + size] for k, v in batch.items()}
        width = int(part["attention_mask"].sum(1).max())
        yield {k: v[:, :width] if v.ndim > 1 else v for k, v in part.items()}


def with_hidden(model, tokenizer, rows: list[dict | None], first: int, batch_size: int = 32,
                progress: bool = False) -> list[dict | None]:
    """Copies of encoded rows with their cached hidden state (`hidden`), batched by length;
    None entries stay None."""
    out = [None] * len(rows)
    for idx, batch in by_length(model, tokenizer, rows, batch_size, "hidden-state cache", progress):
        for j, h in zip(idx, cache_hidden(model, batch, first)):
            out[j] = {**rows[j], "hidden": h}
    return out


def by_length(model, tokenizer, rows: list[dict | None], batch_size: int, desc: str,
              progress: bool):
    """(row indices, padded batch) over the rows that are not None, sorted by length."""
    present = [i for i, r in enumerate(rows) if r is not None]
    order = sorted(present, key=lambda i: len(rows[i]["input_ids"]))
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        idx = order[i:i + batch_size]
        yield idx, padded(model, tokenizer, [rows[j] for j in idx])


def block_of(model, module_name: str) -> int:
    """Index of the block holding a module ("model.layers.5.mlp.down_proj" -> 5)."""
    prefix, _ = blocks(model)
    return int(module_name[len(prefix) + 1:].split(".")[0])


def first_block(model, module_names) -> int:
    """Index of the lowest block holding an edited module."""
    return min(block_of(model, n) for n in module_names)


@contextmanager
def suffix_only(model, first: int):
    """Run only blocks[first:], fed with cached hidden states as `inputs_embeds`.
    Learned absolute position embeddings (GPT-2's wpe) are zeroed: the cached state already
    contains them."""
    prefix, block_list = blocks(model)
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    handles = []
    wpe = getattr(model.base_model, "wpe", None)
    if wpe is not None:
        handles.append(wpe.register_forward_hook(lambda m, i, out: torch.zeros_like(out)))
    setattr(parent, attr, block_list[first:])
    try:
        yield
    finally:
        setattr(parent, attr, block_list)
        for h in handles:
            h.remove()


def shared_prefix(batch) -> int:
    """Length of the tokens every row of a right-padded batch starts with (the chat
    template's system turn), leaving each row at least one token of its own."""
    ids, lengths = batch["input_ids"], batch["attention_mask"].sum(1)
    same = (ids == ids[:1]).all(0).long().cumprod(0)
    return min(int(same.sum()), int(lengths.min()) - 1)


PREFIX_MIN = 8  # a shared prefix shorter than this is recomputed with each row


def _hidden_at(model, block, **inputs) -> torch.Tensor:
    """The hidden state entering `block` on `inputs`; the blocks above it never run."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.base_model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["h"]


def _with_cache(model, cache) -> dict:
    """The forward's keyword arguments that run it on (and extend) a key-value cache
    (transformers renamed `past_key_values` to `cache` in 5.x)."""
    name = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters \
        else "past_key_values"
    return {"use_cache": True, name: cache}


def wide(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 where it is (a bf16 model's states and logits are read in
    float32; a float64 model's keep their precision)."""
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def cache_hidden(model, batch, first: int) -> list[torch.Tensor]:
    """Hidden states entering blocks[first] for each row of a right-padded batch (unpadded,
    one T_i x d tensor per row, float32 on the CPU). The rows' shared prefix (the system
    turn: half of a zsRE row's tokens on SmolLM2) runs once, the rest of each row on its
    key-value cache."""
    from transformers import DynamicCache

    block = blocks(model)[1][first]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    p = shared_prefix(batch) if len(ids) > 1 and first > 0 else 0  # block 0: nothing to save
    if p < PREFIX_MIN:
        h = _hidden_at(model, block, input_ids=ids, attention_mask=mask, use_cache=False)
        return [wide(h[i, :n]).cpu() for i, n in enumerate(lengths)]
    cache = DynamicCache(config=model.config)
    head = _hidden_at(model, block, input_ids=ids[:1, :p], attention_mask=mask[:1, :p],
                      **_with_cache(model, cache))[0]
    cache.batch_repeat_interleave(len(ids))
    tail = _hidden_at(model, block, input_ids=ids[:, p:], attention_mask=mask,
                      **_with_cache(model, cache))
    return [wide(torch.cat([head, tail[i, :n - p]])).cpu() for i, n in enumerate(lengths)]


class _Stop(Exception):
    """Raised to skip the blocks above the cached one."""


def last_hidden(model, batch, first: int | None = None, prefix=None) -> torch.Tensor:
    """Output of the model body (after its final norm), B x T x d. When the batch carries
    cached hidden states (`batch["hidden"]`, B x T x d, entering blocks[first]), only
    blocks[first:] run; with `prefix` (`prefix_states` of its first p positions), only
    positions p.. run, and the output is theirs (B x (T - p) x d)."""
    if "hidden" not in batch:
        return model.base_model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state
    dtype = next(model.parameters()).dtype
    hidden, cache = batch["hidden"], {"use_cache": False}
    if prefix is not None:
        from transformers import DynamicCache

        kv = DynamicCache()
        for i, (keys, values) in enumerate(prefix):
            kv.update(keys, values, i)
        hidden, cache = hidden[:, prefix[0][0].shape[2]:], _with_cache(model, kv)
    with suffix_only(model, first):
        return model.base_model(inputs_embeds=hidden.to(dtype),
                                attention_mask=batch["attention_mask"],
                                **cache).last_hidden_state


@torch.no_grad()
def prefix_states(model, batch, first: int, p: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values of blocks[first:] on the first `p` positions of a batch that
    carries `hidden`, one (B x heads x p x d_head) pair per block of the model (the blocks
    below `first` never run and repeat `first`'s, which only sizes the cache): what
    `last_hidden(..., prefix=)` reuses when only positions p.. change between calls."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    dtype = next(model.parameters()).dtype
    with suffix_only(model, first):
        model.base_model(inputs_embeds=batch["hidden"][:, :p].to(dtype),
                         attention_mask=batch["attention_mask"][:, :p],
                         **_with_cache(model, cache))
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return [kv[first]] * first + kv[first:]


def forward(model, batch, first: int | None = None, all_logits: bool = False):
    """(logits at label positions [n_tok x vocab], label ids [n_tok], row index [n_tok]);
    `all_logits`: computed at every position, then those kept (the cost that
    position-restricted logits avoid; for benchmarks)."""
    labels = batch["labels"]
    hidden = last_hidden(model, batch, first)[:, :-1]
    mask = labels[:, 1:] != IGNORE
    head = model.get_output_embeddings()
    if all_logits:
        logits = wide(head(hidden))[mask]
    else:
        logits = wide(head(hidden[mask]))
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[mask]
    return logits, labels[:, 1:][mask], rows


@torch.no_grad()
def with_final(model, tokenizer, rows: list[dict | None], first: int | None = None,
               batch_size: int = 32, progress: bool = False) -> list[dict | None]:
    """Copies of encoded rows with `final`: the model's last hidden state at the positions
    that predict a label (n_i x d, float32 on the CPU). Taken from the unedited model, it
    turns the locality loss's `logits_before` into one LM-head product."""
    out = [None] * len(rows)
    for idx, batch in by_length(model, tokenizer, rows, batch_size, "final-state cache", progress):
        hidden = last_hidden(model, batch, first)[:, :-1]
        mask = batch["labels"][:, 1:] != IGNORE
        for b, j in enumerate(idx):
            out[j] = {**rows[j], "final": wide(hidden[b][mask[b]]).cpu()}
    return out


@torch.no_grad()
def logits_before(model, batch, first: int | None = None) -> torch.Tensor:
    """Logits at the label positions without grad: the LM head over the batch's cached
    `final` states when it has them (rows from `with_final`), else a forward."""
    if "final" in batch:
        head = model.get_output_embeddings()
        return wide(head(batch["final"].to(head.weight.dtype)))
    return forward(model, batch, first)[0]


def kl_before_after(logits_before, logits_after, reduction: str = "mean") -> torch.Tensor:
    """KL(p_before || p_after) per token, averaged ("mean") or summed ("sum")."""
    log_p = F.log_softmax(logits_before, -1)
    log_q = F.log_softmax(logits_after, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() if reduction == "mean" else kl.sum()


def with_capture(model, tokenizer, rows: list[dict], modules: dict, first: int | None = None,
                 batch_size: int = 32, progress: bool = False) -> list[dict]:
    """Copies of encoded rows with `captured` ({name: (K_i, Delta_i)}, float32 on the CPU)
    and `loss` (the row's summed fine-tuning loss): `capture` of the unedited model, once."""
    out = [None] * len(rows)
    for idx, batch in by_length(model, tokenizer, rows, batch_size, "capture cache", progress):
        captured, _ = capture(model, modules, batch, first, per_row=True)
        for b, j in enumerate(idx):
            out[j] = {**rows[j], "captured": {n: (k[b], d[b]) for n, (k, d, _) in captured.items()},
                      "loss": next(iter(captured.values()))[2][b]}
    return out


@torch.no_grad()
def key_moments(model, tokenizer, rows: list[dict], modules: dict, first: int | None = None,
                batch_size: int = 32, progress: bool = False,
                every_token: bool = False) -> dict[str, torch.Tensor]:
    """{name: C = mean of u u^T (d_k x d_k, float32)} over the keys u entering each module at
    the positions of `rows` that predict a label (`every_token`: at every token): the second
    moment a key prior (MALMEN) or a covariance (MEMIT, AlphaEdit) preserves."""
    store, sums, count = {}, {}, 0

    def hook(name):
        def fn(module, inputs, output):
            store[name] = inputs[0]
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        for _, batch in by_length(model, tokenizer, rows, batch_size, "key moments", progress):
            last_hidden(model, batch, first)
            if every_token:
                mask = batch["attention_mask"].bool()
            else:
                mask = F.pad(batch["labels"][:, 1:] != IGNORE, (0, 1))
            for name, keys in store.items():
                k = wide(keys[mask])
                sums[name] = sums.get(name, 0) + k.T @ k
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("key_moments needs rows with at least one label token")
    return {n: s / count for n, s in sums.items()}


def output_moments(model, tokenizer, rows: list[dict], modules: dict, first: int | None = None,
                   batch_size: int = 32, progress: bool = False) -> dict[str, torch.Tensor]:
    """{name: G = mean of delta delta^T (d_v x d_v, float64)} over the value gradients delta
    of the rows' summed cross-entropy at each module's output, at the positions that predict
    a label: which output directions the rows' answers depend on (the output side of a
    preservation term, `hypernet.solve.output_bins`)."""
    sums, count = {}, 0
    for _, batch in by_length(model, tokenizer, rows, batch_size, "output moments", progress):
        captured, _ = capture(model, modules, batch, first)
        for name, (_, delta) in captured.items():
            delta = delta.double()
            sums[name] = sums.get(name, 0) + delta.T @ delta
        count += next(iter(captured.values()))[1].shape[0]
    if count == 0:
        raise ValueError("output_moments needs rows with at least one label token")
    return {n: s / count for n, s in sums.items()}


def stack_captured(rows: list[dict], device) -> tuple[dict, torch.Tensor]:
    """`capture`'s output for a batch of rows that carry `captured` (from `with_capture`)."""
    names = rows[0]["captured"]
    out = {n: tuple(torch.cat([r["captured"][n][i] for r in rows]).to(device) for i in (0, 1))
           for n in names}
    return out, torch.stack([r["loss"] for r in rows]).sum()


def capture(model, modules: dict, batch, first: int | None = None, per_row: bool = False):
    """Keys and value gradients of the fine-tuning loss (summed cross-entropy of the labels)
    at the positions that predict a label (the end-of-turn token included), for each edited
    module.

    Returns ({name: (K [n x d_k], Delta [n x d_v])}, loss). No parameter gets a gradient.
    With `per_row`, each module maps to (K rows, Delta rows, per-row losses), split by row
    and moved to the CPU."""
    store = {}

    def hook(name):
        def fn(module, inputs, output):
            if output.requires_grad:
                output.retain_grad()
            else:
                output.requires_grad_()
            store[name] = (inputs[0].detach(), output)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        with torch.enable_grad():
            logits, labels, row = forward(model, batch, first)
            losses = F.cross_entropy(logits, labels, reduction="none")
            loss = losses.sum()
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    mask = batch["labels"][:, 1:] != IGNORE
    out = {}
    for name, (keys, values) in store.items():
        out[name] = (wide(keys[:, :-1][mask]), wide(values.grad[:, :-1][mask]))
    if per_row:
        counts = mask.sum(1).tolist()
        row_loss = torch.zeros(mask.shape[0], device=losses.device)
        row_loss = row_loss.index_add(0, row, losses.detach())
        out = {n: (k.cpu().split(counts), d.cpu().split(counts), row_loss.cpu())
               for n, (k, d) in out.items()}
    return out, loss.detach()


@torch.no_grad()
def predictions(model, tokenizer, rows, first=None, batch_size: int = 32,
                confidence: bool = False):
    """Per-row (argmax ids, label ids) at the answer positions (the label positions without
    a final end-of-turn label), in the rows' order (batched by length; a None row gives
    None); with `confidence`, also the argmax's probability there. Rows may carry cached
    hidden states entering blocks[first]."""
    out = [None] * len(rows)
    for idx, batch in by_length(model, tokenizer, rows, batch_size, "predictions", False):
        logits, labels, row = forward(model, batch, first)
        top, pred = logits.softmax(-1).max(-1) if confidence else (None, logits.argmax(-1))
        for b, j in enumerate(idx):
            keep = row == b
            end = int(keep.sum()) - int(bool(rows[j].get("eot")))
            out[j] = (pred[keep][:end], labels[keep][:end]) + (
                (top[keep][:end],) if confidence else ())
    return out


@torch.no_grad()
def answer_nll(model, tokenizer, rows, first=None, batch_size: int = 32) -> list:
    """Per row, the mean negative log-likelihood of its answer tokens (the positions of
    `predictions`), in the rows' order (None for a None row)."""
    out = [None] * len(rows)
    for idx, batch in by_length(model, tokenizer, rows, batch_size, "nll", False):
        logits, labels, row = forward(model, batch, first)
        nll = F.cross_entropy(logits, labels, reduction="none")
        for b, j in enumerate(idx):
            keep = row == b
            end = int(keep.sum()) - int(bool(rows[j].get("eot")))
            out[j] = nll[keep][:end].mean().item()
    return out


def accuracy(preds) -> float:
    """Mean over rows of the per-row token accuracy."""
    return sum((p == y).float().mean().item() for p, y in preds) / max(len(preds), 1)
