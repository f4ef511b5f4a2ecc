"""One meta-training run, from a composed config to a run folder (scripts/train.py's body).

    run(cfg, out)   # loads the model and data, builds the method's editor, meta-trains it
                    # (resuming from out/checkpoint.safetensors or train.resume_from), checks
                    # it on held-out test facts; writes checkpoint.safetensors,
                    # history.jsonl, curves.png and metrics.json into `out`

A method that is not meta-trained (FT) is only checked on validation and test facts.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .. import checkpoint
from ..chat import sliced
from ..data import load_facts
from ..evaluation.metrics import answer_matches, edit_metrics, generation_metrics
from ..evaluation.panel import Probes, nested, panel_rows
from ..files import digest, pyplot, save_figure, write_atomic, write_json
from ..methods import get_method
from ..models import edit_modules, load_model
from .meta import (MetaTrainer, check_config, check_pool, fact_keys, load_data,
                   memory_estimate, prepare_data, save_data, sizes, train, validation_metrics)


def make_logger(cfg, out: Path, past: list[dict]):
    """Appends records to history.jsonl (rewritten from the checkpoint's history on resume,
    so steps after the last checkpoint are not doubled) and to wandb if enabled."""
    history = out / "history.jsonl"
    write_atomic(history, "".join(json.dumps(r) + "\n" for r in past))
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


PLOTTED = ("ES", "GS", "LS_subject", "LS_neighbour", "NS", "LS_NQ", "chat_8")


def plot(history: list[dict], path: Path) -> None:
    """Losses (log scale) and validation metrics against the step, as a PNG."""
    try:
        plt = pyplot()
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    for key in ("rephrase_loss", "loc_nq", "loc_subject", "loc_instruction", "loc_harmful"):
        if any(key in r for r in history):
            a.plot(steps, [r.get(key) for r in history], label=key)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.legend()
    val = [r for r in history if "val_ES" in r]
    keys = [k for k in val[-1] if k.startswith("val_") and k.endswith(PLOTTED)] \
        if val else []
    for key in keys:  # val_ES, ... at the first N; val_<N>_ES, ... dashed
        b.plot([r["step"] for r in val], [r.get(key) for r in val], marker="o", label=key,
               linestyle="-" if key.count("_") == 1 else "--")
    b.set_xlabel("step")
    b.set_ylim(0, 1.02)
    b.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _load(cfg):
    device_map = cfg.model.get("device_map")
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype,
                            device=None if device_map else cfg.device,
                            chat_template=cfg.model.chat_template,
                            **({"device_map": device_map} if device_map else {}))
    return model, tok, edit_modules(model, cfg.model.edit.module, list(cfg.model.edit.layers))


def _estimate(cfg, editor, facts, trained: bool) -> dict:
    """The memory estimate printed before any work (rows the cache will hold)."""
    targets = len(facts["train"]) * trained
    rows = 2 * targets + len(facts["train"]) * trained + 3 * len(facts["validation"])  # + nq
    if trained and cfg.train.hidden_cache:
        rows += 2 * cfg.locality.pool_size
    captured = targets * cfg.train.hidden_cache
    return memory_estimate(editor.model, editor.modules, editor.hypernet if trained else None,
                           rows if cfg.train.hidden_cache else 0, training=trained,
                           n_edits=max(sizes(cfg.train.n_edits)) if trained else 0,
                           captured_rows=captured)


# editor options that change only numerics or memory, not what is learned
NEUTRAL = {"name", "hyper_chunk", "solve_memory_gb"}


def check_resume(method, config, path: Path) -> None:
    """A killed run resumes with the editor options it started with: its checkpoint saved
    with others (say, a default changed since) is an error naming them, before any work."""
    _, meta = checkpoint.load(path, with_tensors=False)  # the tensors load later, once
    saved = asdict(method.saved_config(meta["config"]["editor"]))
    changed = {k: (saved[k], v) for k, v in asdict(config).items()
               if k not in NEUTRAL and saved[k] != v}
    if changed:
        raise ValueError(f"{path} was meta-trained with other editor options (saved -> now: "
                         + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                         + "); resume it with its own (editor.<option>=...) or use a new run "
                         "folder")


def run(cfg, out: Path) -> dict:
    """Meta-train (or, for a method with nothing to train, only check) one editor; returns
    and writes metrics.json."""
    out = Path(out)
    check_config(cfg)  # before any work: ranges of train.*, named in the error
    method = get_method(cfg.editor.rule)
    config = method.config_from(OmegaConf.to_container(cfg.editor, resolve=True))
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    own = out / "checkpoint.safetensors"  # a killed run resumes its own checkpoint,
    resume = own if own.exists() else cfg.train.resume_from  # never its starting one
    if method.meta_trained and own.exists():
        check_resume(method, config, own)
    model, tok, modules = _load(cfg)
    system, trained = cfg.model.system_prompt, method.meta_trained
    facts = {s: load_facts(cfg.data.name, s, val_size=cfg.data.val_size, seed=cfg.data.seed,
                           limit=cfg.train.train_facts if s == "train" else None)
             for s in ("train", "validation")}
    test = (load_facts(cfg.data.name, "test", limit=cfg.train.test_facts)
            if cfg.train.test_facts else None)  # 0: no final check on the test split
    if trained:
        check_pool(cfg.train.n_edits, fact_keys(facts["train"]))
    editor = method.cls.from_config(model, tok, modules, config, system)
    estimate = _estimate(cfg, editor, facts, trained)
    print("memory estimate (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in estimate.items()))
    start = time.perf_counter()
    data = prepare(cfg, editor, facts, out / PREPARED if trained else None)
    metrics = {"prepare_seconds": time.perf_counter() - start, "memory_estimate_gib": estimate}
    print(f"prepared {len(data.edit)} training facts in {metrics['prepare_seconds']:.0f}s")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    meta = {"config": {**resolved, "editor": asdict(config)}, "model": cfg.model.name,
            "modules": list(modules), "rule": method.name}
    if trained:
        trainer = MetaTrainer(editor, data, cfg.train, cfg.locality, seed=cfg.seed)
        if resume is not None and Path(resume).exists():
            trainer.load(resume)
            print(f"resumed from {resume} at step {trainer.step_count}")
        log, wandb_run = make_logger(cfg, out, trainer.history)
        metrics.update(train(trainer, cfg.train.steps, out, cfg.train.val_every,
                             cfg.train.ckpt_every, meta, log))
        plot(trainer.history, out / "curves.png")
        if wandb_run is not None:
            wandb_run.finish()
    else:
        probes = Probes(editor.model, editor.tokenizer, "validation", cfg.model.system_prompt)
        metrics.update({f"val_{k}": v for k, v in
                        validation_metrics(editor, data.val, probes=probes).items()})
    if test is not None:
        metrics.update(test_metrics(cfg, editor, test))
    metrics["peak_rss_gib"] = peak_rss_gib()
    write_json(out / "metrics.json", metrics)
    (out / PREPARED).unlink(missing_ok=True)  # done: nothing left to resume
    return metrics


PREPARED = "prepared.safetensors"  # a meta-training run's prepared data, until it finishes
PREPARED_FORMAT = 2  # what prepared data holds (2: the locality panel's validation rows)


def prepare(cfg, editor, facts, path: Path | None):
    """`prepare_data` of the run, or, when `path` holds data prepared from the same config
    (a killed run, resumed), that data: on a slow machine preparing takes longer than many
    steps. Written there (`save_data`) for the next resume; the run removes it when done."""
    trained = path is not None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # a locality weight decides only whether its source is prepared, not what it holds
    locality = {k: v > 0 if k.endswith("_coef") else v
                for k, v in resolved["locality"].items() if k != "name"}
    spec = digest([PREPARED_FORMAT, resolved["model"], resolved["data"], locality,
                   {k: resolved["train"][k]
                    for k in ("train_facts", "hidden_cache", "batch_size")},
                   cfg.editor.get("prior"), sorted(editor.modules)])
    if trained and path.exists():
        data = load_data(path, spec, editor)
        if data is not None:
            print(f"prepared data of the killed run: {path}")
            return data
    data = prepare_data(editor, facts["train"] if trained else [], facts["validation"],
                        cfg.locality if trained else None, cfg.train.hidden_cache,
                        cfg.train.batch_size, cfg.model.system_prompt)
    if trained:
        save_data(path, data, spec)
    return data


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux counts KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def test_metrics(cfg, editor, test) -> dict:
    """The final check: the test facts edited at once (greedy answers on `train.test_gen`)."""
    model, tok, system = editor.model, editor.tokenizer, cfg.model.system_prompt
    rows = panel_rows(model, tok, test, system)
    if cfg.train.hidden_cache:
        rows = {k: nested(lambda rs: editor.lm.with_hidden(rs, cfg.train.batch_size), r)
                for k, r in rows.items()}
    probes = Probes(model, tok, "test", system, cfg.train.batch_size)

    def answers():  # greedy answers while the test edit is applied
        return generation_metrics(answer_matches(model, tok, list(test)[:cfg.train.test_gen],
                                                 cfg.train.answer_tokens, cfg.train.batch_size,
                                                 system))

    start = time.perf_counter()
    out = {f"test_{k}": v for k, v in edit_metrics(
        editor, sliced(rows, len(test)), extra=answers if cfg.train.test_gen else None,
        probes=probes).items()}
    out["test_seconds"] = time.perf_counter() - start
    return out
