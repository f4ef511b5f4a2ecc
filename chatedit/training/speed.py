"""Seconds per meta-training step, with and without the hidden-state cache and with logits
at every position or at the label positions only (scripts/bench.py)."""

from __future__ import annotations

from ..data import load_facts
from ..evaluation.speed import PeakMemory
from ..timing import Laps, sync
from .meta import MetaTrainer, prepare_data


def bench_training(editor, cfg, system) -> list[dict]:
    """`cfg.train_steps` steps per setting (the first dropped: it warms up), the training
    options of `cfg.train` and `cfg.locality`."""
    n = cfg.train.n_edits * (cfg.train_steps + 1)
    facts = list(load_facts(cfg.data.name, "train", val_size=cfg.data.val_size))[:n]
    rows = []
    for cache, restricted in ((True, True), (True, False), (False, True), (False, False)):
        data = prepare_data(editor, facts, facts[:8], cfg.locality, cache, cfg.train.batch_size,
                            system)
        trainer = MetaTrainer(editor, data, cfg.train, cfg.locality, seed=cfg.seed,
                              all_logits=not restricted)
        laps = Laps(sync(cfg.device))
        times = []
        with PeakMemory(cfg.device) as mem:
            for _ in range(cfg.train_steps):
                laps("between")
                trainer.step()
                laps("step")
                times.append(laps.seconds.pop("step"))
        times = times[1:] if len(times) > 1 else times
        rows.append({"hidden_cache": cache, "logits_at_labels_only": restricted,
                     "seconds_per_step": sum(times) / len(times), "peak_mib": mem.mib})
        print(rows[-1])
    best = rows[0]["seconds_per_step"]
    for r in rows:
        r["slowdown"] = r["seconds_per_step"] / best
    return rows
