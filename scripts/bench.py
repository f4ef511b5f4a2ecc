"""Benchmark: the cost of an edit against its floor, meta-training speed, memory.

    python scripts/bench.py                          # embedded model, MALMEN, CPU
    python scripts/bench.py device=cuda ns=[128,1024,4096]
    python scripts/bench.py model=tiny-llama editor=mend

Edit of N facts at once, split into capture (forward + backward to the edited modules),
hypernetwork, solve and apply, against the floor: one plain forward + backward over the
same N chat-formatted facts computing the edited weights' gradient (the least work any
gradient-based editor does), measured in the same run, same chunks. Meta-training: seconds
per step at the configured settings with and without the cache (`train.hidden_cache`: what
the frozen, unedited model gives each training row is computed once: the hidden state
entering the first edited block, the facts' captured keys and value gradients, the
locality rows' final states) and with and without position-restricted logits.

With `editor_checkpoint` (a trained editor), also the diagnostics of massive editing
(`editor.diagnose`): per edited module at each N of `diagnose_ns`, the joint solve's
relative residual, mean leverage tr(H)/n and float32-vs-float64 difference (facts from every
split of zsRE and CounterFact, 4,419 in all: a measurement of the solve, not a selection),
and ES/GS/LS on the validation split of `data` at each N of `scale_ns`, as trained and with
one test-time lever of `levers` changed at a time (step-size multiplier, end-of-turn rows,
lambda and mu per rows). Writes bench.json and prints tables.
"""

import json
import platform
import threading
import time
from pathlib import Path

import hydra
import psutil
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from editor import Editor
from editor.data import load_facts
from editor.diagnose import lever_sweep, solve_diagnostics
from editor.editors import HyperEditor, build_hypernet, hyper_options
from editor.lm import all_logits, forward, padded, row_chunks
from editor.metrics import conversations, fact_rows
from editor.models import edit_modules, load_model
from editor.report import markdown_table, write_atomic
from editor.train import MetaTrainer, prepare_data


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or the process RSS sampled
    every 5 ms on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            proc = psutil.Process()
            self.base = self.peak = proc.memory_info().rss
            self.running = True

            def sample():
                while self.running:
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.005)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.mib = (self.peak - self.base) / 2**20


def clock(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def fact_batch(model, tok, n: int, system) -> dict:
    """N chat-formatted facts (zsRE test, then train; repeated when N exceeds both)."""
    facts = list(load_facts("zsre", "test")) + list(load_facts("zsre", "train"))
    facts = (facts * (n // len(facts) + 1))[:n]
    return padded(model, tok, conversations(tok, facts, "edit", system))


def floor(editor, batch, device) -> float:
    """Forward + backward over the batch (same chunks as the edit), weight gradients of the
    edited modules only."""
    weights = [m.weight for m in editor.modules.values()]
    for w in weights:
        w.requires_grad_(True)
    start = clock(device)
    try:
        for chunk in row_chunks(batch, editor.chunk_size):
            logits, labels, _ = forward(editor.model, chunk)
            F.cross_entropy(logits, labels, reduction="sum").backward()
        return clock(device) - start
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None


def timed_edit(editor: HyperEditor, batch, device) -> dict:
    """The edit, split into its parts (the same calls HyperEditor.compute_shifts makes)."""
    t = {"start": clock(device)}
    captured = editor.capture(batch)
    t["capture"] = clock(device)
    hn, shifts, values = editor.hypernet, {}, {}
    with torch.no_grad():
        for name, (k, d) in captured.items():
            net, layer = hn.net(name), hn.index[name]
            if hn.rule == "malmen":
                values[name] = net.values(k, d, layer, editor.hyper_chunk)
            else:
                shifts[name] = net.mend_shift(k, d, layer, chunk=editor.hyper_chunk)
        t["hypernetwork"] = clock(device)
        for name, v in values.items():
            k = captured[name][0]
            shifts[name] = hn.net(name).solve(k, v, hn.index[name], editor.solve_dtype)
        t["solve"] = clock(device)
    editor.apply(shifts)
    t["apply"] = clock(device)
    editor.restore()
    parts = ["start", "capture", "hypernetwork", "solve", "apply"]
    out = {p: t[p] - t[q] for q, p in zip(parts, parts[1:])}
    out["tokens"] = next(iter(captured.values()))[0].shape[0]
    return out


def bench_edits(editor, cfg, system) -> list[dict]:
    rows = []
    for n in cfg.ns:
        batch = fact_batch(editor.model, editor.tokenizer, n, system)
        if cfg.warmup:
            timed_edit(editor, {k: v[:2] for k, v in batch.items()}, cfg.device)
        base = floor(editor, batch, cfg.device)
        with PeakMemory(cfg.device) as mem:
            parts = timed_edit(editor, batch, cfg.device)
        total = sum(parts[p] for p in ("capture", "hypernetwork", "solve", "apply"))
        rows.append({"n_facts": n, **parts, "edit": total, "floor": base,
                     "ratio": total / base, "peak_mib": mem.mib})
        print(f"N={n}: edit {total:.2f}s, floor {base:.2f}s, ratio {total / base:.2f}")
    return rows


def bench_training(editor, cfg, system) -> list[dict]:
    """Seconds per meta-training step: cache on/off x logits at label positions only/all."""
    n = cfg.train.n_edits * (cfg.train_steps + 1)
    facts = list(load_facts(cfg.data.name, "train", val_size=cfg.data.val_size))[:n]
    rows = []
    for cache, restricted in ((True, True), (True, False), (False, True), (False, False)):
        data = prepare_data(editor, facts, facts[:8], cfg.locality, cache, cfg.train.batch_size,
                            system)
        trainer = MetaTrainer(editor, data, cfg.train, cfg.locality, seed=cfg.seed)
        times = []
        with PeakMemory(cfg.device) as mem:
            for _ in range(cfg.train_steps):
                start = clock(cfg.device)
                if restricted:
                    trainer.step()
                else:
                    with all_logits():
                        trainer.step()
                times.append(clock(cfg.device) - start)
        times = times[1:] if len(times) > 1 else times  # first step warms up
        rows.append({"hidden_cache": cache, "logits_at_labels_only": restricted,
                     "seconds_per_step": sum(times) / len(times), "peak_mib": mem.mib})
        print(rows[-1])
    best = rows[0]["seconds_per_step"]
    for r in rows:
        r["slowdown"] = r["seconds_per_step"] / best
    return rows


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.device,
                            chat_template=cfg.model.chat_template)
    modules = edit_modules(model, cfg.model.edit.module, list(cfg.model.edit.layers))
    system = cfg.model.system_prompt
    if cfg.editor_checkpoint:
        editor = Editor.from_pretrained(model, cfg.editor_checkpoint, tokenizer=tok,
                                        system=system).shifter
        editor.chunk_size = cfg.chunk_size
    else:
        hypernet = build_hypernet(modules, cfg.editor).to(cfg.device)
        editor = HyperEditor(model, tok, modules, hypernet, system, chunk_size=cfg.chunk_size,
                             **hyper_options(cfg.editor))
    result = {"hardware": hardware(cfg.device), "device": cfg.device, "model": cfg.model.name,
              "rule": cfg.editor.rule, "config": OmegaConf.to_container(cfg, resolve=True)}
    result["edits"] = bench_edits(editor, cfg, system)
    if cfg.editor_checkpoint and cfg.diagnose_ns:
        pool = [f for name in ("zsre", "counterfact") for split in ("train", "validation", "test")
                for f in load_facts(name, split)]
        result["solve"] = solve_diagnostics(editor, pool, list(cfg.diagnose_ns))
        print(markdown_table(result["solve"], ["n_facts", "module", "key_rows", "residual",
                                               "leverage", "fp32_vs_fp64"]))
    if cfg.editor_checkpoint and cfg.scale_ns:
        val = load_facts(cfg.data.name, "validation", val_size=cfg.data.val_size,
                         seed=cfg.data.seed)
        rows = fact_rows(tok, val, system)
        levers = OmegaConf.to_container(cfg.levers)
        result["levers"] = lever_sweep(editor, rows, list(cfg.scale_ns), levers)
        print(markdown_table(result["levers"], ["n_facts", "changed", *levers, "ES",
                                                "ES_strict", "GS", "GS_strict", "LS",
                                                "edit_seconds"]))
    if cfg.train_steps:
        result["training"] = bench_training(editor, cfg, system)
    out = Path(HydraConfig.get().runtime.output_dir)
    write_atomic(out / "bench.json", json.dumps(result, indent=2))
    print(f"\n{cfg.model.name}, {cfg.editor.rule}, {result['hardware']}")
    if cfg.ns:
        print(markdown_table(result["edits"], ["n_facts", "tokens", "capture", "hypernetwork",
                                               "solve", "apply", "edit", "floor", "ratio",
                                               "peak_mib"]))
    if cfg.train_steps:
        print(markdown_table(result["training"], ["hidden_cache", "logits_at_labels_only",
                                                  "seconds_per_step", "slowdown", "peak_mib"]))
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
