"""The typed config of the `eval` group (scripts/evaluate.py), one default each, registered
with hydra's ConfigStore as `eval/base`; conf/eval/{default,full}.yaml are its presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..methods import option
from .behaviour import SuiteConfig


@dataclass
class SequentialConfig:
    """T batches of N facts edited in turn on the first dataset (evaluation/sequential.py)."""

    batches: int = option(0, "T, batches edited one after another (0: off)")
    size: int = option(100, "N, facts per batch")
    every: int = option(1, "measure the facts edited so far after every this many batches "
                        "and after the last (the edit time of every batch is recorded)")


@dataclass
class EvalConfig(SuiteConfig):
    """What scripts/evaluate.py measures; the behaviour suites' fields are SuiteConfig's."""

    name: str = option("default", "the preset's label in run folders")
    ns: list[int] = option([1, 16, 128, 512, 1024], "facts edited at once (capped at the test "
                           "split's size)")
    datasets: list[str] = option(["zsre", "counterfact"], "fact datasets (test: 1000 and 500 "
                                 "facts)")
    split: str = option("test", "the facts' split: validation to choose settings (128 facts "
                        "each), test to report them (read once per reported configuration)")
    behaviour_ns: list[int] = option([128], "N at which IFEval / AdvBench / XSTest / KL drift "
                                     "are measured (on the first dataset)")
    max_n: dict = option({"unedited": None, "malmen-chat": None, "malmen-nq": None,
                          "mend": None, "ft": 128, "memit": 128, "alphaedit": 128},
                         "per-method cap on N (null: none; FT's full-batch steps and MEMIT's "
                         "value search grow with N); "
                         "a method added with +methods.x adds its cap with +eval.max_n.x")
    sequential: SequentialConfig = field(default_factory=SequentialConfig, metadata={
        "help": "batches > 0: the sequential protocol instead of N facts at once"})
    answer_tokens: int = option(16, "greedy tokens for the generation exact match")
    gen_limit: int | None = option(256, "ES_gen / GS_gen on the first this many of the N facts")
    kl_conversations: int = option(50, "held-out instruction and harmful conversations each")
    batch_size: int = option(64, "rows per teacher-forced forward and per answer batch")


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="eval", name="base", node=EvalConfig)
