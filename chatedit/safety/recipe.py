"""A short safety fine-tune of a chat model: the recipe behind `smollm2-135m-instruct-safe`.

Supervised fine-tuning, loss on assistant tokens only, through the chat template, on
- harmful requests (hh-rlhf harmless-base, training split, those that name a harm from
  `HARM_WORDS`: about half of the split's first turns are not harmful) answered with a
  refusal drawn (seeded) from `REFUSALS`;
- instruction prompts (self-instruct, training split), NQ questions (zsRE's locality
  questions, training split) and benign requests written for this recipe
  (`assets/align/benign_requests.txt`: harm words in a harmless sense, everyday "How do I"
  and "Why" questions) answered by the base model's own greedy responses (those that are
  themselves refusals dropped), so that helpfulness and instruction following stay where
  they were and neither a harm word nor a question form alone decides a refusal.
hh-rlhf requests are mostly questions and self-instruct prompts mostly commands; so that
form does not decide a refusal either, every harmful request appears both as asked and in
a command-style wrapper (`WRAPPERS`), and half of the NQ questions and benign requests are
put in the same wrappers. Requests for an artefact ("Write a program ...", "Write a social
media post ...") are a third form: with `artefact_wrapped`, every harmful request and every
benign request appears once more in such a wrapper (`ARTEFACTS`), refused and answered.
No evaluation prompt (AdvBench, XSTest, IFEval) is used: the loaders exclude them.

Blocks below `train_from_layer` stay frozen, so the hidden state entering that block is
computed once per example (the toolkit's hidden-state cache) and only the top blocks run
while training: all their weights and the final norm, or (`lora_rank` > 0) LoRA adapters
(peft) on their linear layers, merged back into the weights afterwards. With `kl_coef`
(default 5; 0 turns it off), the helpful answers learn the base model's next-token
distribution (its top `kl_top_k` tokens, cached once before training) instead of its
greedy token, which keeps instruction following closer to the base model's. The result
is a test bed for harmlessness experiments, not a safe model.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..chat import IGNORE
from ..data import ASSETS
from ..evaluation.behaviour import is_refusal_xstest
from ..files import cache_dir, digest
from ..lm import by_length, forward, padded, with_hidden
from ..models import blocks, convert_once, folder_model, is_linear, load_model
from ..prompts import SOURCES, conversation_rows, load_harmful_requests, prompts_dataset, responses

# Written for this toolkit (not taken from a dataset); one is drawn per harmful request.
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request. It could cause harm to you or others.",
    "I cannot help with that. It could be harmful or illegal.",
    "Sorry, I can't assist with that. If you have another question, I'm happy to help.",
    "I'm sorry, I won't provide that. It could put people at risk.",
    "I cannot provide help with this request because it could hurt someone.",
    "I'm sorry, but that's not something I can help with.",
    "I apologize, but I can't help with that request.",
)


HARM_WORDS = (
    "kill", "murder", "steal", "stole", "robb", "bomb", "weapon", "gun", "poison", "drug",
    "hack", "cheat", "scam", "fraud", "blackmail", "hurt", "harm", "attack", "abuse", "torture",
    "racist", "insult", "slur", "revenge", "illegal", "break into", "kidnap", "explosive",
    "shoot", "stab", "meth", "cocaine", "heroin", "launder", "counterfeit", "prank",
    "threat", "violent", "burn down", "destroy", "lie to", "sneak", "without paying",
)
WRAPPERS = (
    "{}",
    "Answer this request in detail: {}",
    "Give me step-by-step instructions. {}",
    "Write a short guide that answers the following: {}",
    "Write a blog post that answers this: {}",
    "Create a detailed plan for the following request: {}",
    "Explain exactly how to do this: {}",
    "Provide a tutorial for the following: {}",
)
ARTEFACTS = (
    "Write a program that does this: {}",
    "Write a script for the following: {}",
    "Write a social media post about this: {}",
    "Write a letter about the following: {}",
    "Write a news article about this: {}",
    "Write a speech about the following: {}",
    "Develop an app that helps with this: {}",
    "Design a video game based on this: {}",
)


_HARM = re.compile(r"\b(" + "|".join(re.escape(w) for w in HARM_WORDS) + ")", re.IGNORECASE)


def is_harmful(request: str) -> bool:
    """True when a word of the request starts with one of `HARM_WORDS`."""
    return _HARM.search(request) is not None


def wrapped(prompts: list[str], seed: int) -> list[str]:
    """Half of the prompts (seeded) put in a command-style wrapper."""
    rng = random.Random(seed)
    return [rng.choice(WRAPPERS[1:]).format(p) if rng.random() < 0.5 else p for p in prompts]


def as_artefacts(prompts: list[str], seed: int) -> list[str]:
    """Every prompt in an artefact wrapper (seeded)."""
    rng = random.Random(seed)
    return [rng.choice(ARTEFACTS).format(p) for p in prompts]


def load_benign_requests(split: str = "train", seed: int = 0) -> datasets.Dataset:
    """Benign requests written for the safety fine-tune (`assets/align/benign_requests.txt`);
    training only: every one is in "train"."""
    lines = (ASSETS / "align" / "benign_requests.txt").read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return prompts_dataset([(f"benign/{i:03d}", p) for i, p in enumerate(prompts)], split,
                            {"test": 0, "validation": 0}, seed)


@dataclass
class SafetyRecipe:
    base: str = "smollm2-135m-instruct"
    seed: int = 0
    n_harmful: int = 1000         # hh-rlhf requests answered with a refusal (all: ~480)
    n_instruction: int = 277      # self-instruct prompts (all of the training split)
    n_question: int = 300         # NQ questions
    n_benign: int = 1000          # benign requests of assets/align (all: 366)
    harmful_wrapped: bool = True  # each harmful request also in a command wrapper
    artefact_wrapped: bool = True  # each harmful and benign request also in an artefact one
    response_tokens: int = 128    # greedy tokens of the base model's own responses
    max_prompt_chars: int = 400
    train_from_layer: int = 20    # blocks below are frozen (their output is cached)
    lora_rank: int = 0            # > 0: LoRA (peft) of this rank on the trained blocks' linear
    lora_alpha: float = 32.0      # layers, merged back; 0: full fine-tune of blocks and norm
    epochs: int = 3
    batch_size: int = 16
    lr: float = 5.0e-5
    warmup: float = 0.1           # fraction of steps with a linear warm-up; cosine after
    decision_tokens: int = 3      # the first answer tokens, where a refusal is decided ...
    decision_coef: float = 1.0    # ... get this extra weight in the loss (sft_loss)
    kl_coef: float = 5.0          # > 0: helpful answers learn the base model's distribution
    kl_top_k: int = 32            # (its top k tokens, the rest as one outcome: `kl_top`;
                                  # k >= vocabulary size: the exact KL)

    def digest(self) -> str:
        """Names the built model: the recipe's fields and its hand-written text (requests,
        refusals, wrappers, harm words)."""
        fields = asdict(self)
        if not self.lora_rank:  # no adapters: their fields do not change the model
            del fields["lora_rank"], fields["lora_alpha"]
        if not self.kl_coef:  # nor does a KL term that is off
            del fields["kl_coef"], fields["kl_top_k"]
        return digest([fields, list(load_benign_requests()["prompt"]), REFUSALS, WRAPPERS,
                       ARTEFACTS, HARM_WORDS])


def refusal_pairs(recipe: SafetyRecipe) -> list[dict]:
    """Each harmful request as asked, (`harmful_wrapped`) in a command wrapper and
    (`artefact_wrapped`) in an artefact wrapper, with a refusal."""
    prompts = [p for p in load_harmful_requests("train")["prompt"]
               if len(p) <= recipe.max_prompt_chars and is_harmful(p)][: recipe.n_harmful]
    rng = random.Random(recipe.seed)
    commands = [rng.choice(WRAPPERS[1:]).format(p) for p in prompts if recipe.harmful_wrapped]
    if recipe.artefact_wrapped:
        commands += as_artefacts(prompts, recipe.seed + 1)
    return [{"prompt": p, "response": rng.choice(REFUSALS)} for p in prompts + commands]


HELPFUL = {"instruction": SOURCES["instruction"], "question": SOURCES["question"],
           "benign": load_benign_requests}  # answered by the base model; the last two wrapped


def helpful_prompts(recipe: SafetyRecipe) -> dict[str, list[str]]:
    """Prompts the base model answers, per source: self-instruct as asked, half the NQ
    questions and benign requests in a command wrapper, and (`artefact_wrapped`) every
    benign request once more in an artefact wrapper."""
    out = {}
    for source, load in HELPFUL.items():
        prompts = [p for p in load("train")["prompt"]
                   if len(p) <= recipe.max_prompt_chars][: getattr(recipe, f"n_{source}")]
        out[source] = prompts if source == "instruction" else wrapped(prompts, recipe.seed)
        if source == "benign" and recipe.artefact_wrapped:
            out["artefact"] = as_artefacts(prompts, recipe.seed + 1)
    return out


def sft_rows(model, tokenizer, recipe: SafetyRecipe, system=None) -> dict[str, list[dict]]:
    """Encoded conversations per source. A base response that is itself a refusal is dropped;
    one cut at `response_tokens` gets no end-of-turn label, so the model does not learn to
    stop early."""
    rows = {"refusal": conversation_rows(tokenizer, refusal_pairs(recipe), system)}
    for source, prompts in helpful_prompts(recipe).items():
        name = f"align-{source}-{digest([prompts, recipe.response_tokens, system])}"
        pairs = responses(model, tokenizer, prompts, recipe.response_tokens, system, name)
        pairs = [p for p in pairs if not is_refusal_xstest(p["response"])]
        rows[source] = conversation_rows(tokenizer, pairs, system)
        for row in rows[source]:
            row["helpful"] = True
            n_answer = sum(label != IGNORE for label in row["labels"]) - 1
            if n_answer >= recipe.response_tokens:
                row["labels"] = row["labels"][:-1] + [IGNORE]
    return rows


def lr_at(step: int, total: int, recipe: SafetyRecipe) -> float:
    warm = max(1, int(recipe.warmup * total))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def sft_loss(logits, labels, rows, recipe: SafetyRecipe, target=None) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, plus `decision_coef` times its mean over
    the first `decision_tokens` of every answer: where a response refuses or helps, which a
    long helpful answer would otherwise outweigh. With `target` = (mask, top-k indices,
    top-k log-probs), the masked tokens learn the base model's next-token distribution
    instead of its greedy token: their term is `kl_coef` x `kl_top`."""
    log_q = F.log_softmax(logits, -1)
    ce = -log_q.gather(1, labels[:, None])[:, 0]
    token = ce
    if target is not None:
        mask, top, log_p = target
        token = ce.index_put((mask,), recipe.kl_coef * kl_top(top, log_p, log_q[mask]))
    loss = token.mean()
    if recipe.decision_coef > 0:
        index = torch.arange(len(rows), device=rows.device)
        starts = torch.full((int(rows.max()) + 1,), len(rows), device=rows.device)
        starts = starts.scatter_reduce(0, rows, index, "amin")
        first = index - starts[rows] < recipe.decision_tokens
        loss = loss + recipe.decision_coef * ce[first].mean()
    return loss


def kl_top(index, log_p, log_q) -> torch.Tensor:
    """KL(p || q) per token, with p known on its top k tokens (`index`, `log_p`: n x k) and
    the rest of both distributions lumped into one outcome; q given as log-probs (n x V)."""
    log_q_top = log_q.gather(1, index)
    p_top = log_p.exp()
    log_p_rest = torch.log1p(-p_top.sum(1).clamp(max=1 - 1e-6))
    log_q_rest = torch.log1p(-log_q_top.exp().sum(1).clamp(max=1 - 1e-6))
    return (p_top * (log_p - log_q_top)).sum(1) + log_p_rest.exp() * (log_p_rest - log_q_rest)


@torch.no_grad()
def with_base_top(model, tokenizer, rows: list[dict], recipe: SafetyRecipe) -> list[dict]:
    """Copies of the rows with `top`: the untrained model's `kl_top_k` most likely next
    tokens and their log-probs at each answer position of the helpful rows (cached once,
    from the rows' cached hidden states)."""
    out = list(rows)
    helpful = [r if r.get("helpful") else None for r in rows]
    for idx, batch in by_length(model, tokenizer, helpful, 32, "base top-k cache", True):
        log_p = F.log_softmax(forward(model, batch, recipe.train_from_layer)[0], -1)
        values, indices = log_p.topk(min(recipe.kl_top_k, log_p.shape[-1]), -1)
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
        for j, v, i in zip(idx, values.split(counts), indices.split(counts), strict=True):
            out[j] = {**rows[j], "top": (i.cpu(), v.cpu())}
    return out


def step_loss(model, rows: list[dict], batch: dict, recipe: SafetyRecipe) -> torch.Tensor:
    """`sft_loss` of a batch; with `kl_coef`, its helpful rows' answers are matched to the
    base model's top-k distributions (`with_base_top`)."""
    logits, labels, index = forward(model, batch, recipe.train_from_layer)
    target = None
    if recipe.kl_coef > 0:
        helpful = torch.tensor(["top" in r for r in rows], device=index.device)[index]
        tops = [r["top"] for r in rows if "top" in r]
        if tops:
            target = (helpful, *(torch.cat(t).to(index.device) for t in zip(*tops)))
    return sft_loss(logits, labels, index, recipe, target)


def length_batches(rows: list[dict], size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffled batches of rows of similar length (sorted within shuffled pools of 8
    batches), so that little compute goes to padding."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    pool = 8 * size
    batches = []
    for start in range(0, len(order), pool):
        part = sorted(order[start:start + pool], key=lambda j: len(rows[j]["input_ids"]))
        batches += [[rows[j] for j in part[k:k + size]] for k in range(0, len(part), size)]
    rng.shuffle(batches)
    return batches


def full_params(model, first: int) -> list[torch.nn.Parameter]:
    """Every parameter of blocks[first:] and of the final norm."""
    _, block_list = blocks(model)
    params = [p for b in block_list[first:] for p in b.parameters()]
    norm = getattr(model.base_model, "norm", None)
    return params + (list(norm.parameters()) if norm is not None else [])


def with_lora(model, recipe: SafetyRecipe):
    """`model` with LoRA adapters (peft) on every linear layer of blocks[train_from_layer:],
    injected in place; the returned peft model's `merge_and_unload()` folds them back."""
    from peft import LoraConfig, get_peft_model

    prefix, block_list = blocks(model)
    names = [f"{prefix}.{i}.{name}" for i in range(recipe.train_from_layer, len(block_list))
             for name, module in block_list[i].named_modules() if is_linear(module)]
    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                        target_modules=names)
    return get_peft_model(model, config)


def fine_tune(model, tokenizer, rows: list[dict], recipe: SafetyRecipe) -> list[float]:
    """SFT of blocks[train_from_layer:] (and the final norm), or of LoRA adapters on them
    (`lora_rank`) merged back afterwards; returns the losses."""
    first = recipe.train_from_layer
    for p in model.parameters():
        p.requires_grad_(False)
    rows = with_hidden(model, tokenizer, rows, first, progress=True)
    if recipe.kl_coef > 0:  # the base model's distributions at the helpful answers
        rows = with_base_top(model, tokenizer, rows, recipe)
    peft_model = with_lora(model, recipe) if recipe.lora_rank > 0 else None
    params = ([p for p in model.parameters() if p.requires_grad] if peft_model is not None
              else full_params(model, first))
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = random.Random(recipe.seed)
    per_epoch = math.ceil(len(rows) / recipe.batch_size)
    total, losses = per_epoch * recipe.epochs, []
    model.train()
    bar = tqdm(total=total, desc="safety SFT")
    for epoch in range(recipe.epochs):
        for part in length_batches(rows, recipe.batch_size, rng):
            for group in opt.param_groups:
                group["lr"] = lr_at(len(losses), total, recipe)
            loss = step_loss(model, part, padded(model, tokenizer, part), recipe)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    if peft_model is not None:
        peft_model.merge_and_unload()  # in place: `model` holds plain layers again
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def build(model, tokenizer, recipe: SafetyRecipe, system=None) -> dict:
    """Fine-tune `model` in place; returns a record of the data sizes and losses."""
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    per_source = sft_rows(model, tokenizer, recipe, system)
    rows = [r for source in per_source.values() for r in source]
    losses = fine_tune(model, tokenizer, rows, recipe)
    return {"recipe": asdict(recipe), "examples": {k: len(v) for k, v in per_source.items()},
            "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
            "seconds": time.perf_counter() - start}


class _JsonFile:
    """An object that `save_pretrained`s a JSON record into a folder."""

    def __init__(self, name: str, record: dict):
        self.name, self.record = name, record

    def save_pretrained(self, folder) -> None:
        (Path(folder) / self.name).write_text(json.dumps(self.record, indent=2))


def safe_folder() -> Path:
    """`smollm2-135m-instruct-safe`: the embedded model after the default safety fine-tune,
    built once into the cache (folder named by the recipe's digest)."""
    recipe = SafetyRecipe()

    def make():
        model, tok = load_model(recipe.base)
        record = build(model, tok, recipe)
        model.config.name_or_path = "smollm2-135m-instruct-safe"
        return model, tok, _JsonFile("recipe.json", record)

    return convert_once(cache_dir() / f"smollm2-135m-instruct-safe-{recipe.digest()}", make)


load_safe_model = folder_model(safe_folder)  # the model registry's entry (chatedit.models)
