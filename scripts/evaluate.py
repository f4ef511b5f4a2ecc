"""Evaluate editors as the number of facts edited at once grows.

    python scripts/evaluate.py                                   # conf/eval/default.yaml
    python scripts/evaluate.py model=smollm2-135m-instruct-safe \\
        methods.malmen-chat.checkpoint=outputs/train/.../checkpoint.safetensors
    python scripts/evaluate.py eval=full

For each method (unedited, FT, MEND, MALMEN with nq or chat locality; an editor whose
checkpoint is null is looked up in `editors_dir`, where `make editors` trains it, and
skipped if absent; FT is capped by `eval.max_n`) and each N, N held-out facts are edited at
once and measured: ES/GS teacher-forced (token accuracy) and by generation (greedy answer,
normalised exact match), LS (argmax agreement with the unedited model on unrelated prompts),
on each dataset; at the N in `eval.behaviour_ns`, with the edit applied: IFEval
(prompt/instruction, strict/loose), AdvBench refusal rate, XSTest over-refusal rate and
KL(unedited || edited) on held-out instruction and harmful-request conversations. Same
prompts and greedy decoding for every method, so differences are the edit's. Writes
results.json (one record per method x N x dataset x metric, plus the config), results.md
(with the behaviour change against the unedited model) and results.png.
"""

import json
import time
from functools import cached_property
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from editor import Editor
from editor.behaviour import behaviour_suite
from editor.data import load_facts
from editor.editors import NoEditor
from editor.lm import forward, kl_before_after, padded, with_hidden
from editor.locality import base_responses, conversation_rows
from editor.metrics import (answer_matches, edit_metrics, fact_row, generation_metrics,
                            predictions, present, teacher_forced)
from editor.models import edit_modules, load_model
from editor.report import markdown_table, write_atomic


def checkpoint(name, spec, cfg):
    """The method's editor checkpoint: its own, else the one `make editors` writes; None for
    methods that need none, False where none exists."""
    if spec.rule in ("none", "ft"):
        return None
    path = spec.checkpoint or Path(cfg.editors_dir) / name / "checkpoint.safetensors"
    return str(path) if spec.checkpoint or path.exists() else False


def shifter(name, spec, model, tok, cfg):
    """The editor of one method, on the shared model (each restores it after every edit)."""
    if spec.rule == "none":
        return NoEditor(model, tok, edit_modules(model, cfg.model.edit.module,
                                                 list(cfg.model.edit.layers)),
                        cfg.model.system_prompt)
    if spec.rule == "ft":
        return Editor.from_pretrained(model, None, tokenizer=tok, system=cfg.model.system_prompt,
                                      module=cfg.model.edit.module,
                                      layers=list(cfg.model.edit.layers), steps=spec.steps,
                                      lr=spec.lr).shifter
    options = {k: v for k, v in spec.items() if k not in ("rule", "checkpoint")}  # test-time
    return Editor.from_pretrained(model, checkpoint(name, spec, cfg), tokenizer=tok,
                                  system=cfg.model.system_prompt, **options).shifter


class Drift:
    """KL(unedited || edited) on held-out conversations answered by the unedited model."""

    def __init__(self, model, tok, cfg):
        self.model, self.tok, self.rows, self.before = model, tok, {}, {}
        for source in ("instruction", "harmful"):
            pairs = base_responses(model, tok, source, cfg.eval.kl_conversations,
                                   cfg.eval.refusal_tokens, 400, cfg.model.system_prompt,
                                   split="test")
            rows = conversation_rows(tok, pairs, cfg.model.system_prompt)
            self.rows[source] = [rows[i:i + cfg.eval.batch_size]
                                 for i in range(0, len(rows), cfg.eval.batch_size)]
            self.before[source] = self.logits(source)

    @torch.no_grad()
    def logits(self, source):
        return [forward(self.model, padded(self.model, self.tok, b))[0].cpu()
                for b in self.rows[source]]

    def __call__(self) -> dict:
        return {f"kl_{s}": kl_before_after(torch.cat(self.before[s]),
                                           torch.cat(self.logits(s))).item()
                for s in self.rows}


def matches(model, tok, facts, cfg) -> list[tuple]:
    return answer_matches(model, tok, facts, cfg.eval.answer_tokens, cfg.eval.batch_size,
                          cfg.model.system_prompt)


class Reference:
    """One test pool as the unedited model sees it, computed once per (dataset, first edited
    block): every fact's rows (None: no rephrase / loc prompt) with cached hidden states, the
    unedited model's teacher-forced predictions on them, and its greedy-answer matches on the
    first `eval.gen_limit` facts. The unedited method's numbers at N are slices of it; every
    editor's LS compares with its loc predictions."""

    def __init__(self, model, tok, pool, first, cfg):
        bs = cfg.eval.batch_size
        self.rows = {k: with_hidden(model, tok, [fact_row(tok, f, k, cfg.model.system_prompt)
                                                 for f in pool], first, bs, progress=True)
                     for k in ("edit", "rephrase", "loc")}
        self.before = {k: predictions(model, tok, rs, first, bs) for k, rs in self.rows.items()}
        self.answer = lambda: matches(model, tok, pool[:cfg.eval.gen_limit], cfg)

    @cached_property
    def matches(self) -> list[tuple]:
        return self.answer()

    def unedited(self, n: int) -> dict:
        before = {k: present(p[:n]) for k, p in self.before.items()}
        return {**teacher_forced(before["edit"], before["rephrase"], before["loc"],
                                 before["loc"]),
                "n_facts": n, "edit_seconds": 0.0, **generation_metrics(self.matches[:n])}


def behaviour_metrics(model, tok, drift, cfg) -> dict:
    """KL drift, IFEval, AdvBench and XSTest scores of the model as it is now."""
    return {**drift(), **behaviour_suite(model, tok, cfg.eval,
                                         system=cfg.model.system_prompt)["scores"]}


def evaluate(cfg, save=None) -> list[dict]:
    """All records; `save(records)` is called after each method, so a stopped run keeps the
    methods it finished."""
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.device,
                            chat_template=cfg.model.chat_template)
    methods = {k: v for k, v in cfg.methods.items() if checkpoint(k, v, cfg) is not False}
    skipped = sorted(set(cfg.methods) - set(methods))
    if skipped:
        print(f"skipping methods without a checkpoint: {', '.join(skipped)} (none in "
              f"{cfg.editors_dir}/<method>/; `make editors` trains them)")
    drift = Drift(model, tok, cfg) if cfg.eval.behaviour_ns else None  # only where measured
    pools = {d: list(load_facts(d, "test")) for d in cfg.eval.datasets}
    refs, records = {}, []
    for name, spec in methods.items():
        editor = shifter(name, spec, model, tok, cfg)
        max_n = cfg.eval.max_n.get(name) or float("inf")
        for dataset, pool in pools.items():
            key = (dataset, editor.first)
            if key not in refs:
                start = time.perf_counter()
                refs[key] = Reference(model, tok, pool, editor.first, cfg)
                print(f"reference {dataset}: {time.perf_counter() - start:.0f}s")
            ref = refs[key]
            behaviour_ns = {min(b, len(pool)) for b in cfg.eval.behaviour_ns}
            for n in sorted({min(n, len(pool)) for n in cfg.eval.ns if n <= max_n}):
                behaviour = n in behaviour_ns and dataset == cfg.eval.datasets[0]

                start = time.perf_counter()
                if spec.rule == "none":  # no edit: slices of the reference
                    metrics = ref.unedited(n)
                    if behaviour:
                        metrics.update(behaviour_metrics(model, tok, drift, cfg))
                else:
                    def extra(facts=pool[:n], behaviour=behaviour):
                        out = generation_metrics(matches(model, tok, facts[:cfg.eval.gen_limit],
                                                         cfg))
                        return {**out, **behaviour_metrics(model, tok, drift, cfg)} \
                            if behaviour else out

                    rows = {k: present(rs[:n]) for k, rs in ref.rows.items()}
                    metrics = edit_metrics(editor, rows, cfg.eval.batch_size, extra,
                                           before=present(ref.before["loc"][:n]))
                metrics["seconds"] = time.perf_counter() - start
                print(f"{name} {dataset} N={n}: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                records += [{"method": name, "dataset": dataset, "n": n, "metric": k,
                             "value": float(v)} for k, v in metrics.items() if k != "n_facts"]
        editor.restore()
        if save is not None:
            save(records)
    return records


BEHAVIOUR = ["ifeval_prompt_strict", "advbench_refusal", "xstest_over_refusal", "kl_instruction",
             "kl_harmful"]
EDIT = ["ES", "ES_strict", "GS", "GS_strict", "ES_gen", "GS_gen", "LS"]
CHANGED = ["ifeval_prompt_strict", "ifeval_inst_strict", "advbench_refusal",
           "xstest_over_refusal"]


def table(records: list[dict]) -> str:
    """One row per method x dataset x N; the edit metrics, then behaviour where measured."""
    cells = {}
    for r in records:
        key = (r["method"], r["dataset"], r["n"])
        row = cells.setdefault(key, dict(zip(("method", "data", "N"), key)))
        row[r["metric"]] = r["value"]
    cols = EDIT + [m for m in BEHAVIOUR if any(m in c for c in cells.values())]
    return markdown_table(list(cells.values()), ["method", "data", "N", *cols])


def changes(records: list[dict]) -> str:
    """Behaviour against the unedited model at the same dataset and N, in points."""
    value = {(r["method"], r["dataset"], r["n"], r["metric"]): r["value"] for r in records}
    cells = {}
    for (method, dataset, n, metric), v in value.items():
        base = value.get(("unedited", dataset, n, metric))
        if method != "unedited" and metric in CHANGED and base is not None:
            row = cells.setdefault((method, dataset, n),
                                   {"method": method, "data": dataset, "N": n})
            row[metric] = f"{100 * (v - base):+.1f}"
    if not cells:
        return ""
    cols = [m for m in CHANGED if any(m in c for c in cells.values())]
    return ("Change against the unedited model (points):\n\n" +
            markdown_table(list(cells.values()), ["method", "data", "N", *cols]))


def report(records: list[dict]) -> str:
    return "\n\n".join(t for t in (table(records), changes(records)) if t) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in EDIT + BEHAVIOUR if any(r["metric"] == m for r in records)]
    datasets = sorted({r["dataset"] for r in records})
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
        ax.set_xlabel("facts edited at once")
        ax.set_title(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    out = Path(HydraConfig.get().runtime.output_dir)

    def save(records):
        write_atomic(out / "results.json", json.dumps(
            {"config": OmegaConf.to_container(cfg, resolve=True), "records": records,
             "seconds": time.perf_counter() - start}, indent=2))
        write_atomic(out / "results.md", report(records))

    records = evaluate(cfg, save)
    text = report(records)
    plot(records, out / "results.png")
    print(f"\n{text}\n\nwrote {out / 'results.json'} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
