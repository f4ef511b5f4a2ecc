"""Why an editor holds or loses many facts at once: the joint solve per module as N grows,
and what a test-time multiplier of the learned step size does.

- `solve_diagnostics`: for N facts edited at once, per edited module, the relative residual
  ||K S - D|| / ||D||, the mean leverage tr(K A^-1 K^T) / n and the float32-vs-float64
  difference of S (`hypernet.diagnostics`);
- `step_scale_sweep`: ES / GS / LS of N facts with the shift multiplied by each scale.
"""

from __future__ import annotations

from .chat import encode_facts
from .metrics import edit_metrics, sliced


def solve_diagnostics(editor, facts: list, ns: list[int]) -> list[dict]:
    """One record per N x module (MALMEN editors: the solve is what is diagnosed)."""
    if editor.hypernet.rule != "malmen":
        raise ValueError(f"solve diagnostics need the least-squares rule, not "
                         f"{editor.hypernet.rule!r}")
    out = []
    for n in ns:
        if n > len(facts):
            raise ValueError(f"{n} facts asked for, {len(facts)} available")
        batch = encode_facts(editor.tokenizer, facts[:n], editor.system)
        for name, (keys, grads) in editor.capture(batch).items():
            stats = editor.hypernet.diagnose(name, keys, grads, editor.hyper_chunk)
            out.append({"n_facts": n, "module": name, "key_rows": keys.shape[0], **stats})
    return out


def step_scale_sweep(editor, rows: dict, ns: list[int], scales: list[float]) -> list[dict]:
    """Edit metrics of the first N facts of aligned `rows` (`metrics.fact_rows`) with the
    shift scaled by each of `scales`; the editor's own scale is restored afterwards."""
    own, out = editor.step_scale, []
    try:
        for n in ns:
            for scale in scales:
                editor.step_scale = scale
                metrics = edit_metrics(editor, sliced(rows, n))
                out.append({"n_facts": n, "step_scale": scale, **metrics})
    finally:
        editor.step_scale = own
    return out
