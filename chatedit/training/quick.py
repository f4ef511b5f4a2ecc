"""A quick MALMEN editor for a model: meta-trained once with a small recipe, then cached
(what `make demo` and `Editor.quick` use; minutes on a CPU)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ..files import cache_dir, digest
from .config import register
from .run import run

CONF = Path(__file__).resolve().parents[1] / "conf"  # the hydra configs, in the package

# scripts/train.py overrides of the quick recipe
QUICK = (
    "locality=nq",
    "locality.nq_coef=10",   # strong locality: unrelated answers stay as they were
    "train.steps=60",
    "train.n_edits=16",
    "train.train_facts=480",  # half the zsRE training facts: half the preparation, and on
                              # validation level with all (ES 1.00, GS 1.00, LS 0.85 at 60)
    "train.val_every=20",
    "train.ckpt_every=10",
    "data.val_size=32",
    "train.test_facts=32",
    "train.test_gen=0",      # no greedy-answer check in the quick run
)


def train_config(overrides):
    """conf/config.yaml (what scripts/train.py composes) with `overrides`; inside a running
    hydra app (scripts/edit.py) its config search path is used."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=list(overrides))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def quick_recipe(model: str, data: str = "zsre", overrides=None):
    """(train config, cache folder) of the quick editor for `model`; the folder is named by
    the resolved config, so a changed default (not only a changed override) retrains."""
    overrides = [f"model={model}", f"data={data}", *(QUICK if overrides is None else overrides)]
    cfg = train_config(overrides)
    name = digest(OmegaConf.to_container(cfg, resolve=True))
    return cfg, cache_dir() / "editors" / f"quick-{Path(model).name}-{name}"


def quick_editor(model: str, data: str = "zsre", overrides=None) -> Path:
    """The checkpoint of a quick editor for `model` (a registry name or folder), trained
    into the cache if absent (a killed training resumes)."""
    cfg, folder = quick_recipe(model, data, overrides)
    if not (folder / "metrics.json").exists():
        print(f"no cached quick editor for {model}: meta-training one into {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, folder / "config.yaml")
        run(cfg, folder)
    return folder / "checkpoint.safetensors"
