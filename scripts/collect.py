"""Gather the metrics.json / results.json of a sweep folder into one table and plot.

    python scripts/collect.py multirun/train/2026-11-22_10-00-00
    python scripts/collect.py multirun/train/... --metrics val_ES val_GS val_LS --x train.n_edits

Each job folder's swept overrides come from its .hydra/overrides.yaml. Writes collect.json,
collect.md and collect.png into the sweep folder.
"""

import argparse
from pathlib import Path

from editor.evaluation.sweeps import DEFAULT_METRICS, jobs, plot, swept, table
from editor.files import write_atomic, write_json


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a hydra multirun folder")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help=f"columns (default: those of {DEFAULT_METRICS} present)")
    parser.add_argument("--x", default=None, help="a numeric swept key to plot against")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        parser.error(f"{args.sweep} is not a folder")
    records = jobs(args.sweep)
    if not records:
        parser.error(f"no metrics.json or results.json under {args.sweep}")
    metrics = args.metrics or [m for m in DEFAULT_METRICS
                               if any(m in r["metrics"] for r in records)]
    keys = swept(records)
    text = table(records, keys, metrics)
    print(text)
    write_atomic(args.sweep / "collect.md", text + "\n")
    write_json(args.sweep / "collect.json", records)
    if plot(records, keys, metrics, args.x, args.sweep / "collect.png"):
        print(f"wrote {args.sweep / 'collect.png'}")
    return records


if __name__ == "__main__":
    main()
