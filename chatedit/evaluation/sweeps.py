"""A training sweep folder's runs as one table and plot (scripts/collect.py): each job
folder's metrics.json, with the overrides it was launched with (its .hydra/overrides.yaml).
Evaluation runs merge instead (`suite.merge`)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..files import pyplot, save_figure
from .report import markdown_table

DEFAULT_METRICS = ["val_ES", "val_GS", "val_LS_subject", "val_LS_NQ", "val_chat_8", "test_ES",
                   "test_GS", "test_LS_subject", "test_LS_NQ", "test_chat_8",
                   "seconds_per_step"]


def jobs(sweep: Path) -> list[dict]:
    """One record per job folder holding metrics.json."""
    out = []
    for metrics in sorted(sweep.rglob("metrics.json")):
        job = metrics.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        flat = json.loads(metrics.read_text())
        out.append({"job": str(job.relative_to(sweep)),
                    "overrides": dict(o.split("=", 1) for o in overrides if "=" in o),
                    "metrics": {k: v for k, v in flat.items() if isinstance(v, (int, float))}})
    return out


def swept(records: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs."""
    keys = sorted({k for r in records for k in r["overrides"]})
    return [k for k in keys if len({r["overrides"].get(k) for r in records}) > 1]


def table(records: list[dict], keys: list[str], metrics: list[str]) -> str:
    rows = [{**{k: r["overrides"].get(k, "") for k in keys},
             **{m: float(v) for m, v in r["metrics"].items() if m in metrics}} for r in records]
    return markdown_table(rows, keys + metrics, missing="-")


def plot(records, keys, metrics, x, path: Path) -> bool:
    try:
        plt = pyplot()
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    if x and x in keys:  # one line per metric and setting of the other swept keys
        groups = {}
        for r in records:
            rest = ", ".join(f"{k}={r['overrides'].get(k)}" for k in keys if k != x)
            groups.setdefault(rest, []).append(r)
        for rest, rs in groups.items():
            rs = sorted(rs, key=lambda r: float(r["overrides"][x]))
            for m in metrics:
                pts = [(float(r["overrides"][x]), r["metrics"][m]) for r in rs if m in r["metrics"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{m} {rest}".strip())
        ax.set_xlabel(x)
    else:  # grouped bars, one group per job
        width = 0.8 / max(len(metrics), 1)
        for i, m in enumerate(metrics):
            ax.bar([j + i * width for j in range(len(records))],
                   [r["metrics"].get(m, 0) for r in records], width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))])
        ax.set_xticklabels([", ".join(r["overrides"].get(k, "") for k in keys) or r["job"]
                            for r in records], rotation=20, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True
