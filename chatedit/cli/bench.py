"""Benchmark: the cost of an edit against its floor, meta-training speed, memory.

    python scripts/bench.py                          # embedded model, MALMEN, CPU
    python scripts/bench.py device=cuda ns=[128,1024,4096]
    python scripts/bench.py model=tiny-llama editor=mend

Edits of N facts at once, in the editor's own stages (capture, hypernetwork, solve, apply),
against a plain forward + backward over the same facts (chatedit.evaluation.speed);
meta-training seconds per step with and without the hidden-state cache and position-
restricted logits (chatedit.training.speed). With `editor_checkpoint` (a trained editor),
also the diagnostics of massive editing (chatedit.evaluation.diagnose): each solve group
(the modules sharing one solve) at each N of `diagnose_ns` (facts from every split of zsRE
and CounterFact: a measurement of the solve, not a selection), and ES/GS/LS on the
validation split of `data` at each N of `scale_ns`, as trained and with one test-time lever
of `levers` changed at a time. Writes bench.json and prints tables.
"""

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from chatedit import Editor
from chatedit.evaluation.diagnose import massive_diagnostics
from chatedit.evaluation.metrics import CONFIDENCE_BINS
from chatedit.evaluation.report import markdown_table
from chatedit.evaluation.speed import STAGES, bench_edits, bench_lifelong, hardware
from chatedit.files import write_atomic
from chatedit.methods import get_method
from chatedit.models import edit_modules, load_model
from chatedit.training.config import register
from chatedit.training.speed import bench_training

register()  # the train, locality and editor groups (typed, in chatedit.training.config)


@hydra.main(config_path="pkg://chatedit.conf",
            config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    system = cfg.model.system_prompt
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.device,
                            chat_template=cfg.model.chat_template)
    if cfg.editor_checkpoint:
        editor = Editor.from_pretrained(model, cfg.editor_checkpoint, tokenizer=tok,
                                        system=system).method
    else:  # an untrained editor of the configured method, for timing
        method = get_method(cfg.editor.rule)
        module, layers = method.default_edit(model) if method.own_layers else \
            (cfg.model.edit.module, list(cfg.model.edit.layers))  # MEMIT: its own layers
        modules = edit_modules(model, module, layers)
        editor = method.cls.from_config(model, tok, modules, method.config_from(
            OmegaConf.to_container(cfg.editor, resolve=True)), system)
    editor.chunk_size = cfg.chunk_size
    result = {"hardware": hardware(cfg.device), "device": cfg.device, "model": cfg.model.name,
              "rule": cfg.editor.rule, "config": OmegaConf.to_container(cfg, resolve=True)}
    tables = []  # (the result's key, its columns): printed as tables
    out = Path(HydraConfig.get().runtime.output_dir)

    def save(partial=None):
        write_atomic(out / "bench.json", json.dumps({**result, **(partial or {})}, indent=2))

    if cfg.ns:
        result["edits"] = bench_edits(editor, cfg.ns, cfg.device, system, cfg.warmup)
        tables.append(("edits", ["n_facts", "tokens", *STAGES, "edit", "floor", "ratio",
                                 "peak_mib"]))
    if cfg.editor_checkpoint:
        result.update(massive_diagnostics(editor, cfg, lambda recs: save({"levers": recs})))
        tables.append(("solve", ["n_facts", "module", "key_rows", "residual", "leverage"]))
        tables.append(("levers", ["n_facts", "changed", *cfg.levers, "ES", "ES_strict", "GS",
                                  "GS_strict", "LS_subject", "LS_neighbour", "NS",
                                  "edit_seconds"]))
        bins = [f"p<{hi:g}" for hi in CONFIDENCE_BINS[1:]]  # LS_subject by confidence
        tables.append(("levers", ["n_facts", "changed", *(f"tokens_{b}" for b in bins),
                                  *(f"LS_subject_{b}" for b in bins)]))
    if cfg.lifelong.batches:
        result["lifelong"] = bench_lifelong(editor, cfg.lifelong.batches, cfg.lifelong.size,
                                            out / "lifelong.png")
    if cfg.train_steps:
        result["training"] = bench_training(editor, cfg, system)
        tables.append(("training", ["hidden_cache", "logits_at_labels_only",
                                    "seconds_per_step", "slowdown", "peak_mib"]))
    save()
    print(f"\n{cfg.model.name}, {cfg.editor.rule}, {result['hardware']}")
    for key, cols in tables:
        if result.get(key):
            print(markdown_table(result[key], cols))
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
