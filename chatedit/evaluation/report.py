"""Readable results: one markdown table writer for every script; the evaluation's tables
(one row per method x dataset x N, and behaviour against the unedited model) and plot."""

from __future__ import annotations

from pathlib import Path

from ..files import pyplot, save_figure


def markdown_table(rows: list[dict], cols: list[str], missing: str = "") -> str:
    """Rows as a markdown table of `cols`: floats with 3 decimals, other values as text,
    `missing` where a row lacks a column."""
    def cell(row, col):
        if col not in row:
            return missing
        value = row[col]
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


BEHAVIOUR = ["ifeval_prompt_strict", "advbench_refusal", "xstest_over_refusal", "kl_instruction",
             "kl_harmful"]
EDIT = ["ES", "ES_strict", "GS", "GS_strict", "ES_gen", "GS_gen"]
LOCALITY = ["LS_subject", "LS_neighbour", "NS", "LS_NQ", "chat_8", "chat_32"]
EXTRA = [*LOCALITY, "ES_first", *BEHAVIOUR, "edit_seconds"]  # columns where measured
CHANGED = ["ifeval_prompt_strict", "ifeval_inst_strict", "advbench_refusal",
           "xstest_over_refusal"]


def table(records: list[dict]) -> str:
    """One row per method x dataset x N; the edit metrics, then where measured the first
    batch's ES (sequential protocol), behaviour and the edit's seconds."""
    cells = {}
    for r in records:
        key = (r["method"], r["dataset"], r["n"])
        row = cells.setdefault(key, dict(zip(("method", "data", "N"), key)))
        row[r["metric"]] = r["value"]
    cols = EDIT + [m for m in EXTRA if any(m in c for c in cells.values())]
    return markdown_table(list(cells.values()), ["method", "data", "N", *cols])


def changes(records: list[dict]) -> str:
    """Behaviour against the unedited model at the same dataset and N (the sequential
    protocol's: its N = 0 record), in points."""
    value = {(r["method"], r["dataset"], r["n"], r["metric"]): r["value"] for r in records}
    cells = {}
    for (method, dataset, n, metric), v in value.items():
        base = value.get(("unedited", dataset, n, metric), value.get(("unedited", dataset, 0,
                                                                      metric)))
        if method != "unedited" and metric in CHANGED and base is not None:
            row = cells.setdefault((method, dataset, n),
                                   {"method": method, "data": dataset, "N": n})
            row[metric] = f"{100 * (v - base):+.1f}"
            lo, hi = (value.get((method, dataset, n, f"{metric}_change_{e}")) for e in ("lo", "hi"))
            if lo is not None and hi is not None:
                row[metric] += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    if not cells:
        return ""
    cols = [m for m in CHANGED if any(m in c for c in cells.values())]
    return ("Change against the unedited model (points; [paired bootstrap 95% interval]):\n\n" +
            markdown_table(list(cells.values()), ["method", "data", "N", *cols]))


def report(records: list[dict]) -> str:
    return "\n\n".join(t for t in (table(records), changes(records)) if t) + "\n"


def plot_records(records: list[dict], path: Path) -> None:
    """Each metric against N (log scale; the sequential protocol's: the facts edited so far),
    one line per method (and dataset), as a PNG."""
    plt = pyplot()

    metrics = [m for m in EDIT + LOCALITY + BEHAVIOUR if any(r["metric"] == m for r in records)]
    datasets = sorted({r["dataset"] for r in records})
    xlabel = "facts edited so far" if any("batch" in r for r in records) else \
        "facts edited at once"
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method in dict.fromkeys(r["method"] for r in records):
            for dataset in datasets:
                pts = sorted((r["n"], r["value"]) for r in records if r["method"] == method
                             and r["metric"] == metric and r["dataset"] == dataset)
                if pts:
                    label = method if len(datasets) == 1 else f"{method} ({dataset})"
                    ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
