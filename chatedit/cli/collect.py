"""Gather runs into one table and plot: a sweep folder's jobs, or an evaluation run in parts.

    python scripts/collect.py multirun/train/2026-11-22_10-00-00
    python scripts/collect.py multirun/train/... --metrics val_ES val_LS_subject --x train.n_edits
    python scripts/collect.py outputs/eval/a outputs/eval/b --out outputs/eval/a+b/results

Training jobs (metrics.json): each job folder's swept overrides come from its
.hydra/overrides.yaml; writes collect.json, collect.md and collect.png into the sweep folder
(or `--out`.json/.md/.png). Evaluations (the results.json of scripts/evaluate.py, or a copy
of one, e.g. under docs/) that differ only in their methods, such as one method per run
folder run in parallel, merge into one results file in the same format (`--out`.json, which
evaluate.py resumes like its own), its table (.md), plot (.png) and, for the sequential
protocol, the retention plot (-retention.png).
"""

import argparse
import json
from pathlib import Path

from chatedit.evaluation.report import report
from chatedit.evaluation.suite import merge, plot_results, save_results
from chatedit.evaluation.sweeps import DEFAULT_METRICS, jobs, plot, swept, table
from chatedit.files import write_atomic, write_json


def evaluations(paths: list[Path]) -> dict[str, dict]:
    """{file: results} of the evaluation results (JSON with `records`) at or under `paths`."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("results.json")))]
    found = {}
    for f in files:
        try:
            found[str(f)] = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f} is not a JSON results file: {e}") from None
    return {f: r for f, r in found.items() if isinstance(r, dict) and "records" in r}


def collect_evaluations(runs: dict[str, dict], out: Path) -> None:
    merged = merge(runs)
    print(report(merged["records"]))
    save_results(merged, out.with_suffix(".json"))
    plot_results(merged["records"], out.with_suffix(".png"),
                 out.with_name(out.name + "-retention.png"))
    print(f"merged {len(runs)} evaluations into {out.with_suffix('.json')}")


def collect_sweep(sweep: Path, out: Path, metrics, x, error) -> None:
    records = jobs(sweep)
    if not records:
        error(f"no metrics.json (training) or results.json (evaluation) under {sweep}")
    metrics = metrics or [m for m in DEFAULT_METRICS if any(m in r["metrics"] for r in records)]
    keys = swept(records)
    text = table(records, keys, metrics)
    print(text)
    write_atomic(out.with_suffix(".md"), text + "\n")
    write_json(out.with_suffix(".json"), records)
    if plot(records, keys, metrics, x, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+",
                        help="a hydra multirun folder, or evaluation run folders / results files")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write, without suffix (default: <first folder>/collect)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help=f"columns (default: those of {DEFAULT_METRICS} present)")
    parser.add_argument("--x", default=None, help="a numeric swept key to plot against")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    first = args.paths[0]
    out = args.out or (first if first.is_dir() else first.parent) / "collect"
    try:
        runs = evaluations(args.paths)
        if runs:
            return collect_evaluations(runs, out)
    except ValueError as e:
        parser.error(str(e))
    if len(args.paths) > 1 or not first.is_dir():
        parser.error("several paths or a file: give evaluations (results.json with records)")
    collect_sweep(first, out, args.metrics, args.x, parser.error)


if __name__ == "__main__":
    main()
