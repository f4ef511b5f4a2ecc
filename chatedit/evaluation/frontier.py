"""The edit / locality frontier (scripts/frontier.py): what an editor buys in edit success
and pays in locality, on the validation split.

Each editor (a checkpoint and test-time options: a lever that needs no training is the same
checkpoint with other options) is traced by its test-time step size (`step_scale`), and at
each N the first N validation facts are edited at once and measured: ES, GS, the locality
panel (`panel.py`: LS_subject, LS_neighbour, NS per fact; LS_NQ, chat_8 and chat_32 per
model) and the refusal rate on held-out harmful requests (hh-rlhf validation split,
AdvBench's rule; `refusal_rate`). Records are one per editor x N x step_scale x metric;
the plot puts ES against LS_subject, LS_NQ and the refusal rate, one line per editor and N.
"""

from __future__ import annotations

from ..chat import generate, sliced
from ..files import pyplot, save_figure
from ..prompts import load_harmful_requests
from .behaviour import refusal_rate
from .metrics import edit_metrics

AXES = ("LS_subject", "LS_NQ", "refusal")  # plotted against ES


class Refusals:
    """The refusal rate on `n` held-out harmful requests (hh-rlhf validation split), greedy
    answers of `tokens` tokens, AdvBench's rule."""

    def __init__(self, model, tokenizer, system=None, n: int = 100, tokens: int = 48,
                 batch_size: int = 64):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.prompts = list(load_harmful_requests("validation")["prompt"])[:n]
        self.tokens, self.batch_size = tokens, batch_size

    def __call__(self) -> dict:
        answers = generate(self.model, self.tokenizer, self.prompts, self.tokens,
                           self.batch_size, self.system)
        return {"refusal": refusal_rate(answers)}


def trace(editor, rows: dict, ns: list[int], scales: list[float], probes, refusals,
          done=(), on_record=None) -> list[dict]:
    """Records of `editor` (an `EditMethod` with `step_scale`) at each N and step scale,
    skipping the (n, step_scale) in `done`; `on_record(records)` after each point."""
    own, out = editor.step_scale, []
    try:
        for n in ns:
            for scale in scales:
                if (n, scale) in done:
                    continue
                editor.step_scale = own * scale
                metrics = edit_metrics(editor, sliced(rows, n), probes=probes, extra=refusals)
                print(f"N {n}, step x{scale}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in metrics.items() if not k.startswith(
                        ("tokens_", "LS_subject_p"))))
                out += [{"n": n, "step_scale": scale, "metric": k, "value": float(v)}
                        for k, v in metrics.items()]
                if on_record is not None:
                    on_record(out)
    finally:
        editor.step_scale = own
    return out


def plot_frontier(records: list[dict], unedited: dict, path) -> None:
    """ES against each of `AXES`, one line per editor and N (points: its step scales);
    `unedited`: the unedited model's values, as dotted lines."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 3.8))
    value = {(r["editor"], r["n"], r["step_scale"], r["metric"]): r["value"] for r in records}
    lines = sorted({(r["editor"], r["n"]) for r in records}, key=lambda x: (x[1], x[0]))
    for ax, axis in zip(axes, AXES):
        for editor, n in lines:
            scales = sorted({k[2] for k in value if k[:2] == (editor, n)})
            pts = [(value[editor, n, s, axis], value[editor, n, s, "ES"], s) for s in scales
                   if (editor, n, s, axis) in value and (editor, n, s, "ES") in value]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if n <= 128 else "s",
                    linestyle="-" if n <= 128 else "--", label=f"{editor}, N={n}")
            for x, y, s in pts:
                ax.annotate(f"x{s:g}", (x, y), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
        if axis in unedited:
            ax.axvline(unedited[axis], color="gray", linestyle=":", label="unedited")
        ax.set_xlabel(axis + (" (rate)" if axis == "refusal" else " (agreement)"))
        ax.set_ylabel("ES")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
