"""Typed configs of meta-training: the `train` and `locality` groups and the editor
methods' configs, one default each, registered with hydra's ConfigStore (`register`), so
YAML presets and command-line overrides are checked against them (an unknown key is an
error naming it).

    train/default      TrainConfig
    locality/base      LocalityConfig (conf/locality/{chat,nq,none}.yaml: its differences)
    editor/<method>    each registered method's config (chatedit.methods), e.g. editor=mend
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..methods import METHODS, option


@dataclass
class TrainConfig:
    n_edits: Any = option(64, "facts edited at once per step; a list (e.g. [64, 256, 1024]) "
                          "draws one per step (seeded); never more than the training pool")
    steps: int = option(100, "meta-training steps")
    meta_lr: float = option(1e-4, "Adam learning rate of the hypernetwork")
    scalar_lr: float = option(2e-2, "Adam learning rate of the per-layer log step sizes, "
                              "log lambdas and log mus")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    rephrase_coef: float = option(1.0, "weight of the CE of the target on the rephrases")
    edit_coef: float = option(0.0, "> 0: adds the CE of the target on the edit prompts")
    lm_chunk: int = option(32, "rows per meta-loss forward/backward (bounds memory at any N)")
    val_every: int = option(25, "validate every this many steps")
    val_ns: list[int] | None = option([128], "validation facts edited at once (the first N's "
                                      "metrics are val_ES, ...; the others' val_<N>_ES, ...)")
    ckpt_every: int = option(25, "checkpoint every this many steps")
    hidden_cache: bool = option(True, "cache what the unedited model gives a row once (hidden "
                                "state entering the first edited block, captured keys and "
                                "value gradients, final states)")
    batch_size: int = option(32, "rows per forward when caching and evaluating")
    train_facts: int | None = option(None, "meta-train on the first this many training facts "
                                     "(null: all)")
    test_facts: int = option(128, "final check: this many test facts edited at once (0: none)")
    test_gen: int = option(128, "... with ES_gen / GS_gen (greedy answers) on this many")
    answer_tokens: int = option(16, "greedy tokens per answer for ES_gen / GS_gen")
    resume_from: str | None = option(None, "a checkpoint.safetensors to resume (a run folder "
                                     "resumes its own)")


@dataclass
class LocalityConfig:
    """KL(before || after) on assistant tokens, one weight per source (the defaults: chat)."""

    name: str = option("chat", "the preset's label in run folders")
    nq_coef: float = option(10.0, "the facts' unrelated NQ questions")
    instruction_coef: float = option(1.0, "self-instruct prompts, the base model's answers")
    harmful_coef: float = option(1.0, "hh-rlhf harmful requests, the base model's answers")
    subject_coef: float = option(0.0, "per fact, another relation's question about its subject, "
                                 "the base model's answer")
    n_instruction: int = option(8, "instruction conversations per step")
    n_harmful: int = option(8, "harmful-request conversations per step")
    pool_size: int = option(160, "prompts per source answered by the base model (cached)")
    response_tokens: int = option(40, "greedy tokens per base-model response")
    subject_tokens: int = option(16, "greedy tokens per subject answer")
    max_prompt_chars: int = option(400, "longer prompts are left out")


def register() -> None:
    """Store the groups' schemas in hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="train", name="default", node=TrainConfig)
    cs.store(group="locality", name="base", node=LocalityConfig)
    for name, method in METHODS.items():
        cs.store(group="editor", name=name, node=method.config)
