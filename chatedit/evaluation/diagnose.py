"""Why an editor holds or loses many facts at once: the joint solve as N grows, and what
the test-time lever (the step size) does.

- `solve_diagnostics`: for N facts edited at once, per solve group (the modules sharing one
  solve), the relative residual ||sum_l K_l S_l - D|| / ||D|| and the mean leverage
  (`hypernet.solve.diagnostics`);
- `lever_sweep`: ES / GS / the locality panel's per-fact metrics of N facts as trained and
  with the test-time lever changed (the step-size multiplier), with LS_subject split by the
  unedited model's confidence in its own predictions (`metrics.agreement_by_confidence`:
  whether an edit flips the sure predictions or only the near-ties).
"""

from __future__ import annotations

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ..chat import sliced
from ..data import load_facts
from .metrics import edit_metrics, measure
from .panel import panel_rows


def solve_diagnostics(editor, facts: list, ns: list[int]) -> list[dict]:
    """One record per N x solve (MALMEN editors: the solve is what is diagnosed)."""
    if not editor.hypernet.solves:
        raise ValueError(f"solve diagnostics need the least-squares rule, not "
                         f"{editor.hypernet.rule!r}")
    out = []
    for n in tqdm(ns, desc="solve diagnostics (N)"):
        if n > len(facts):
            raise ValueError(f"{n} facts asked for, {len(facts)} available")
        captured = editor.capture(editor.batch(facts[:n]))  # on the model's device
        rows = next(iter(captured.values()))[0].shape[0]
        for stats in editor.hypernet.diagnose(captured, editor.hyper_chunk):
            modules = stats.pop("modules")
            out.append({"n_facts": n, "module": ",".join(modules), "key_rows": rows, **stats})
    return out


def massive_diagnostics(editor, cfg, on_record=None) -> dict:
    """scripts/bench.py's diagnostics of a trained editor: `solve` at each N of
    `cfg.diagnose_ns` on facts pooled from every split of zsRE and CounterFact, and the
    `levers` sweep on the validation split of `cfg.data` at each N of `cfg.scale_ns`
    (`on_record`: see `lever_sweep`)."""
    out = {}
    if cfg.diagnose_ns:
        pool = [f for name in ("zsre", "counterfact") for split in ("train", "validation", "test")
                for f in load_facts(name, split)]
        out["solve"] = solve_diagnostics(editor, pool, list(cfg.diagnose_ns))
    if cfg.scale_ns:
        val = load_facts(cfg.data.name, "validation", val_size=cfg.data.val_size,
                         seed=cfg.data.seed)
        rows = panel_rows(editor.model, editor.tokenizer, val, editor.system)
        out["levers"] = lever_sweep(editor, rows, list(cfg.scale_ns),
                                    OmegaConf.to_container(cfg.levers), on_record)
    return out


# what a trained editor can change at test time
LEVERS = ("step_scale",)


def _owner(editor, lever: str):
    """What holds a test-time lever: the method."""
    if lever not in LEVERS:
        raise ValueError(f"unknown test-time lever {lever!r}; choose from {LEVERS}")
    return editor


def lever_sweep(editor, rows: dict, ns: list[int], levers: dict[str, list],
                on_record=None) -> list[dict]:
    """Edit metrics of the first N facts of aligned `rows` (`panel.panel_rows`) as trained,
    then with one lever of `levers` ({name: values}) changed at a time; the editor's own
    settings are restored afterwards. Each record names the lever changed (None: as trained)
    and the value of every lever; it is printed as it comes, and `on_record(records so far)`
    (if given) is called, so a long sweep that is stopped keeps what it measured."""
    own = {lever: getattr(_owner(editor, lever), lever) for lever in LEVERS}
    settings = [(None, None)] + [(name, v) for name, values in levers.items() for v in values
                                 if getattr(_owner(editor, name), name) != v]
    out, before = [], {}  # before: the unedited model's locality predictions, with confidence
    try:
        for n, (name, value) in tqdm([(n, s) for n in ns for s in settings],
                                     desc="test-time levers"):
            current = {**own, **({} if name is None else {name: value})}
            for lever, v in current.items():
                setattr(_owner(editor, lever), lever, v)
            part = sliced(rows, n)
            if n not in before:
                before[n] = measure(editor.lm, {k: part[k] for k in ("subject", "neighbour")},
                                    confidence=True)[0]
            metrics = edit_metrics(editor, part, before=before[n])
            out.append({"n_facts": n, "changed": name, **current, **metrics})
            tqdm.write(f"N {n}, {name or 'as trained'}"
                       f"{'' if name is None else f' = {value}'}: " + ", ".join(
                           f"{k} {metrics[k]:.3f}" for k in
                           ("ES", "ES_strict", "GS", "LS_subject", "NS") if k in metrics))
            if on_record is not None:
                on_record(out)
    finally:
        for lever, v in own.items():
            setattr(_owner(editor, lever), lever, v)
    return out
