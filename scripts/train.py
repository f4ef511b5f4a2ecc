"""Meta-train an editor and check it on held-out test facts edited at once.

    python scripts/train.py                                   # MALMEN, chat locality
    python scripts/train.py editor=mend locality=nq train.steps=100
    python scripts/train.py editor=ft                          # baseline: evaluate only
    python scripts/train.py hydra.run.dir=<old run folder>     # resume a killed run
"""

import json
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from editor.data import load_facts
from editor.editors import FTEditor, HyperEditor, build_hypernet, hyper_options
from editor.lm import with_hidden
from editor.metrics import answer_matches, edit_metrics, fact_rows, generation_metrics
from editor.models import edit_modules, load_model
from editor.train import (MetaTrainer, check_config, check_pool, fact_keys,
                          memory_estimate, prepare_data, sizes, train, write_json)


def make_logger(cfg, out: Path, past: list[dict]):
    """Appends records to history.jsonl (rewritten from the checkpoint's history on resume,
    so steps after the last checkpoint are not doubled) and to wandb if enabled."""
    history = out / "history.jsonl"
    history.write_text("".join(json.dumps(r) + "\n" for r in past))
    run = None
    if cfg.wandb.enabled:
        import wandb

        run = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(out),
                         config=OmegaConf.to_container(cfg, resolve=True))

    def log(record):
        with history.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if run is not None:
            run.log(record, step=record.get("step"))

    return log, run


def plot(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    for key in ("gen_loss", "loc_nq", "loc_subject", "loc_instruction", "loc_harmful"):
        if any(key in r for r in history):
            a.plot(steps, [r.get(key) for r in history], label=key)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.legend()
    val = [r for r in history if "val_ES" in r]
    keys = [k for k in val[-1] if k.startswith("val_") and k.endswith(("ES", "GS", "LS"))] \
        if val else []
    for key in keys:  # val_ES, ... at the first N; val_<N>_ES, ... dashed
        b.plot([r["step"] for r in val], [r.get(key) for r in val], marker="o", label=key,
               linestyle="-" if key.count("_") == 1 else "--")
    b.set_xlabel("step")
    b.set_ylim(0, 1.02)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    check_config(cfg)  # before any work: ranges of train.*, named in the error
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device_map = cfg.model.get("device_map")
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype,
                            device=None if device_map else cfg.device,
                            chat_template=cfg.model.chat_template,
                            **({"device_map": device_map} if device_map else {}))
    modules = edit_modules(model, cfg.model.edit.module, list(cfg.model.edit.layers))
    system = cfg.model.system_prompt
    facts = {s: load_facts(cfg.data.name, s, val_size=cfg.data.val_size, seed=cfg.data.seed,
                           limit=cfg.train.train_facts if s == "train" else None)
             for s in ("train", "validation")}
    test = load_facts(cfg.data.name, "test", limit=cfg.train.test_facts)
    if cfg.editor.rule != "ft":
        check_pool(cfg.train.n_edits, fact_keys(facts["train"]))

    if cfg.editor.rule == "ft":
        editor = FTEditor(model, tok, modules, steps=cfg.editor.steps, lr=cfg.editor.lr,
                          system=system)
    else:
        hypernet = build_hypernet(modules, cfg.editor).to(cfg.device)
        editor = HyperEditor(model, tok, modules, hypernet, system, **hyper_options(cfg.editor))
    hyper = isinstance(editor, HyperEditor)  # FT has nothing to meta-train
    targets = (1 + cfg.train.augment.new_targets) * len(facts["train"]) * hyper
    rows = 2 * targets + len(facts["train"]) * hyper + 3 * len(facts["validation"])  # + nq
    if hyper and cfg.train.hidden_cache:
        rows += 2 * cfg.locality.pool_size
    captured = targets * (2 if cfg.train.augment.swap > 0 else 1) * cfg.train.hidden_cache
    estimate = memory_estimate(model, modules, editor.hypernet if hyper else None,
                               rows if cfg.train.hidden_cache else 0, training=hyper,
                               n_edits=max(sizes(cfg.train.n_edits)) if hyper else 0,
                               captured_rows=captured)
    print("memory estimate (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in estimate.items()))
    start = time.perf_counter()
    data = prepare_data(editor, facts["train"] if hyper else [], facts["validation"],
                        cfg.locality if hyper else None, cfg.train.hidden_cache,
                        cfg.train.batch_size, system, cfg.train.augment)
    prep_seconds = time.perf_counter() - start
    print(f"prepared {len(data.edit)} training facts in {prep_seconds:.0f}s")

    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "model": cfg.model.name,
            "modules": list(modules), "rule": cfg.editor.rule}
    metrics = {"prepare_seconds": prep_seconds, "memory_estimate_gib": estimate}
    if hyper:
        trainer = MetaTrainer(editor, data, cfg.train, cfg.locality, seed=cfg.seed)
        resume = cfg.train.resume_from or (out / "checkpoint.safetensors")
        if Path(resume).exists():
            trainer.load(resume)
            print(f"resumed from {resume} at step {trainer.step_count}")
        log, run = make_logger(cfg, out, trainer.history)
        metrics.update(train(trainer, cfg.train.steps, out, cfg.train.val_every,
                             cfg.train.ckpt_every, meta, log))
        plot(trainer.history, out / "curves.png")
        if run is not None:
            run.finish()
    else:
        metrics.update({f"val_{k}": v for k, v in edit_metrics(editor, data.val).items()})

    rows = fact_rows(tok, test, system)
    if cfg.train.hidden_cache:
        rows = {k: with_hidden(model, tok, r, editor.first, cfg.train.batch_size)
                for k, r in rows.items()}

    def answers():  # greedy answers while the test edit is applied
        return generation_metrics(answer_matches(model, tok, list(test)[:cfg.train.test_gen],
                                                 cfg.train.answer_tokens, cfg.train.batch_size,
                                                 system))

    start = time.perf_counter()
    metrics.update({f"test_{k}": v for k, v in edit_metrics(
        editor, rows, extra=answers if cfg.train.test_gen else None).items()})
    metrics["test_seconds"] = time.perf_counter() - start
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
