"""The evaluation suite: methods x N facts edited at once -> records (scripts/evaluate.py).

For each method (unedited, FT, MEND, MALMEN, ...: `cfg.methods`, each a registered method
with its options; a meta-trained one whose checkpoint is null is looked up in
`editors_dir`, where `make editors` trains it, and skipped if absent; FT is capped by
`eval.max_n`) and each N, N held-out facts are edited at once and measured: ES/GS
teacher-forced (token accuracy) and by generation (greedy answer, normalised exact match),
the locality panel (`panel.py`: LS_subject, LS_neighbour and NS per fact; LS_NQ and the
everyday-chat shares per model), on each dataset; at the N in `eval.behaviour_ns`, with the
edit applied: IFEval (prompt/instruction, strict/loose), AdvBench refusal rate, XSTest
over-refusal rate, each change against the unedited model with a paired bootstrap 95%
interval, and KL(unedited || edited) on held-out instruction and harmful-request
conversations. Same prompts and greedy decoding for every method, so differences are the
edit's. Records are one per method x N x dataset x metric.
"""

from __future__ import annotations

import json
import time
from functools import cached_property
from pathlib import Path

import torch

from ..api import Editor
from ..chat import sliced
from ..data import load_facts
from ..editors import Unedited
from ..extras import require
from ..files import write_atomic, write_json
from ..lm import ChatLM, forward, kl_before_after, padded
from ..methods import get_method
from ..models import load_model
from ..prompts import base_responses, conversation_rows
from .behaviour import behaviour_suite, changes
from .metrics import (NLL_KINDS, TOKEN_KINDS, answer_matches, edit_metrics,
                      generation_metrics, teacher_forced)
from .panel import Probes, nested, panel_rows
from .report import plot_records, report
from .sequential import distinct, plot_retention, sequential


def checkpoint(name, spec, cfg):
    """The method's editor checkpoint: its own, else the one `make editors` writes; None for
    methods that need none, False where none exists."""
    if not get_method(spec.rule).meta_trained:
        return None
    path = spec.get("checkpoint") or Path(cfg.editors_dir) / name / "checkpoint.safetensors"
    return str(path) if spec.get("checkpoint") or path.exists() else False


def editor_for(name, spec, model, tok, cfg) -> Editor:
    """The `Editor` of one method on the shared model (each restores it after every edit):
    `spec` is {rule, checkpoint (meta-trained methods), options of the method}."""
    options = {k: v for k, v in spec.items() if k not in ("rule", "checkpoint")}
    ckpt = checkpoint(name, spec, cfg)
    if ckpt is None and not get_method(spec.rule).own_layers:  # a method with nothing
        # learned edits the configured modules, unless it has its own (MEMIT, AlphaEdit)
        options.setdefault("module", cfg.model.edit.module)
        options.setdefault("layers", list(cfg.model.edit.layers))
    return Editor.from_pretrained(model, ckpt, tokenizer=tok, method=spec.rule,
                                  system=cfg.model.system_prompt, **options)


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
    block): every fact's panel rows (`panel_rows`, None where it has none) with cached hidden
    states, the unedited model's teacher-forced predictions and NLLs on them, and its
    greedy-answer matches on the first `eval.gen_limit` facts. The unedited method's numbers
    at N are slices of it; every editor's locality compares with its predictions."""

    def __init__(self, lm: ChatLM, pool, cfg):
        bs = cfg.eval.batch_size
        rows = panel_rows(lm.model, lm.tokenizer, pool, lm.system)
        self.rows = {k: nested(lambda rs: lm.with_hidden(rs, bs, progress=True), r)
                     for k, r in rows.items()}
        # (with the confidence of the subject predictions: LS_subject by confidence)
        self.before = {k: nested(lambda rs, k=k: lm.predictions(rs, bs, k == "subject"),
                                 self.rows[k]) for k in TOKEN_KINDS}
        self.nll = {k: nested(lambda rs: lm.answer_nll(rs, bs), self.rows[k])
                    for k in NLL_KINDS}
        self.answer = lambda: matches(lm.model, lm.tokenizer, pool[:cfg.eval.gen_limit], cfg)

    @cached_property
    def matches(self) -> list[tuple]:
        return self.answer()

    def unedited(self, n: int) -> dict:
        before = sliced(self.before, n)
        return {**teacher_forced({k: v for k, v in before.items() if v},
                                 {k: v for k, v in sliced(self.nll, n).items() if v}, before),
                "n_facts": n, "edit_seconds": 0.0, **generation_metrics(self.matches[:n])}


def behaviour_metrics(model, tok, drift, cfg, baseline=None) -> tuple[dict, dict]:
    """(KL drift, IFEval, AdvBench and XSTest scores of the model as it is now, its
    per-prompt outcomes); with `baseline` (the unedited model's outcomes), each score's
    change with its paired bootstrap 95% interval too."""
    suite = behaviour_suite(model, tok, cfg.eval, system=cfg.model.system_prompt)
    scores = {**drift(), **suite["scores"]}
    if baseline is not None:
        scores.update(changes(suite["outcomes"], baseline))
    return scores, suite["outcomes"]


def within_cap(caps, method: str, n: int) -> bool:
    """Whether `eval.max_n` ({method: cap on the N edited; null or absent: none}) allows
    editing n facts with `method`."""
    cap = caps.get(method)
    return cap is None or n <= cap


def split(config: dict) -> tuple[dict, dict, dict]:
    """A results.json config as (the rest, {method: settings}, {method: cap on N})."""
    rest = {**config, "methods": None, "eval": {**config["eval"], "max_n": None}}
    return rest, config["methods"], config["eval"]["max_n"]


def differ(a: dict, b: dict) -> str:
    """The top-level keys whose values differ, comma-separated ('' when none)."""
    return ", ".join(sorted(k for k in {**a, **b} if a.get(k) != b.get(k)))


def merge(runs: dict[str, dict]) -> dict:
    """The results.json of one evaluation run in parts ({source: results}, e.g. a method per
    run folder, in parallel) as one, which `scripts/evaluate.py` resumes like its own: the
    parts' configs must agree but for their methods and caps; a method in two parts must
    have the same settings, and a record (method x dataset x N x metric x batch) that two
    parts hold comes from the first."""
    first = next(iter(runs))
    base, methods, caps = split(runs[first]["config"])
    methods, caps, records, seen = dict(methods), dict(caps), [], set()
    for source, part in runs.items():
        rest, its_methods, its_caps = split(part["config"])
        changed = differ(base, rest)
        if changed:
            raise ValueError(f"{source} is another evaluation than {first} (config differs "
                             f"in: {changed}); only runs that differ in their methods merge")
        for name, spec in its_methods.items():
            if methods.setdefault(name, spec) != spec:
                raise ValueError(f"method {name!r} has other settings in {source} than in an "
                                 f"earlier part: {spec} != {methods[name]}")
        caps.update({k: v for k, v in its_caps.items() if k not in caps})
        for r in part["records"]:
            key = (r["method"], r["dataset"], r["n"], r["metric"], r.get("batch"))
            if key not in seen:
                seen.add(key)
                records.append(r)
    config = runs[first]["config"]
    config = {**config, "methods": methods, "eval": {**config["eval"], "max_n": caps}}
    return {"config": config, "records": records,
            "seconds": sum(r.get("seconds", 0.0) for r in runs.values())}


def save_results(results: dict, path: Path) -> None:
    """An evaluation's results ({config, records, seconds}) as `path` (JSON) and its table
    beside it (.md)."""
    write_json(path, results)
    write_atomic(path.with_suffix(".md"), report(results["records"]))


def plot_results(records: list[dict], path: Path, retention: Path) -> None:
    """Each metric against N as `path`; the sequential protocol's records (with `batch`)
    also as the retention plot `retention`."""
    plot_records(records, path)
    if any("batch" in r for r in records):
        plot_retention(records, retention)


def finished(path: Path, config: dict) -> list[dict]:
    """The records of a stopped run in the same folder (`path`, its results.json), which
    the run resumes from; none without one; an error if it was run with another config
    but for its methods (`methods` and their `eval.max_n`). A method added is measured;
    the records of a method whose settings changed, or that is gone, are dropped (and the
    former measured again); a method's other cap on N keeps its records at the N it allows
    (an edit of N facts does not depend on the cap) and measures the N it adds."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    (old, old_methods, _), (new, new_methods, caps) = split(saved["config"]), split(config)
    changed = differ(old, new)
    if changed:
        raise ValueError(f"{path} holds the results of another evaluation (config differs in: "
                         f"{changed}); use a new run folder or the same overrides")
    same = {m for m, spec in new_methods.items() if old_methods.get(m) == spec}
    dropped = sorted({r["method"] for r in saved["records"]} - same)
    if dropped:
        print(f"dropping the records of methods whose settings changed or that are gone: "
              f"{', '.join(dropped)}")
    return [r for r in saved["records"]
            if r["method"] in same and within_cap(caps, r["method"], r["n"])]


def evaluate(cfg, save=None, done=()) -> list[dict]:
    """All records; `save(records)` is called after each method and N, so a stopped run
    keeps what it finished; `done` (`finished`) are the records of a stopped run, whose
    method x dataset x N (sequential: method) are not measured again."""
    if cfg.eval.behaviour_ns:
        require("lm_eval", "IFEval scoring (eval.behaviour_ns)")  # before hours of editing
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.device,
                            chat_template=cfg.model.chat_template)
    methods = {k: v for k, v in cfg.methods.items() if checkpoint(k, v, cfg) is not False}
    skipped = sorted(set(cfg.methods) - set(methods))
    if skipped:
        print(f"skipping methods without a checkpoint: {', '.join(skipped)} (none in "
              f"{cfg.editors_dir}/<method>/; `make editors` trains them)")
    drift = Drift(model, tok, cfg) if cfg.eval.behaviour_ns else None  # only where measured
    probes = Probes(model, tok, cfg.eval.split, cfg.model.system_prompt, cfg.eval.batch_size)
    pools = {d: list(load_facts(d, cfg.eval.split)) for d in cfg.eval.datasets}
    refs = {}

    def reference(dataset, first):
        if (dataset, first) not in refs:
            start = time.perf_counter()
            lm = ChatLM(model, tok, cfg.model.system_prompt, first)
            refs[dataset, first] = Reference(lm, pools[dataset], cfg)
            print(f"reference {dataset}: {time.perf_counter() - start:.0f}s")
        return refs[dataset, first]

    records = list(done)
    covered = {(r["method"], r["dataset"], r["n"]) for r in records}
    if records:
        print(f"resuming: {len(covered)} method x dataset x N already measured")
    # the unedited model's behaviour, which every change is against (measured now, unedited)
    baseline = behaviour_metrics(model, tok, drift, cfg) if drift else None
    if cfg.eval.sequential.batches > 0:
        return run_sequential(cfg, model, tok, methods, pools, reference, drift, baseline,
                              save, records)
    for dataset, pool in pools.items():  # what `reference` reads: the facts measured
        pools[dataset] = pool[:max(cfg.eval.ns, default=0)]
    for name, spec in methods.items():
        todo = [(d, n) for d, pool in pools.items()  # the cap is on the N edited
                for n in sorted({min(n, len(pool)) for n in cfg.eval.ns})
                if within_cap(cfg.eval.max_n, name, n) and (name, d, n) not in covered]
        if not todo:
            continue
        editor = editor_for(name, spec, model, tok, cfg).method
        for dataset, n in todo:
            pool = pools[dataset]
            ref = reference(dataset, editor.first)
            behaviour = dataset == cfg.eval.datasets[0] and n in {
                min(b, len(pool)) for b in cfg.eval.behaviour_ns}
            start = time.perf_counter()
            if isinstance(editor, Unedited):  # no edit: slices of the reference
                metrics = {**ref.unedited(n), **probes()}
                if behaviour:  # the same model at every N: measured once
                    metrics.update(baseline[0])
            else:
                def extra(facts=pool[:n], behaviour=behaviour):
                    out = generation_metrics(matches(model, tok, facts[:cfg.eval.gen_limit],
                                                     cfg))
                    return {**out, **behaviour_metrics(model, tok, drift, cfg,
                                                       baseline[1])[0]} if behaviour else out

                metrics = edit_metrics(editor, sliced(ref.rows, n), cfg.eval.batch_size, extra,
                                       before=sliced(ref.before, n), probes=probes)
            metrics["seconds"] = time.perf_counter() - start
            if getattr(editor, "covariance_seconds", None) is not None:  # MEMIT, AlphaEdit
                metrics["covariance_seconds"] = editor.covariance_seconds
            print(f"{name} {dataset} N={n}: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            records += [{"method": name, "dataset": dataset, "n": n, "metric": k,
                         "value": float(v)} for k, v in metrics.items() if k != "n_facts"]
            if save is not None:
                save(records)
        editor.restore()
    return records


def run_sequential(cfg, model, tok, methods, pools, reference, drift, baseline, save,
                   records) -> list[dict]:
    """`eval.sequential` ({batches: T, size: N}) on the first dataset, every method but the
    unedited one (`sequential.py`), after `records` (a stopped run's: their methods are
    skipped); `baseline`: the unedited model's `behaviour_metrics` (None: not measured);
    `save(records)` after each method."""
    seq = cfg.eval.sequential
    batches, size, every = int(seq.batches), int(seq.size), int(seq.get("every", 1))
    if every < 1:
        raise ValueError(f"eval.sequential.every must be a number of batches >= 1, not {every}")
    dataset = cfg.eval.datasets[0]
    facts = distinct(pools[dataset])  # one prompt, one target across batches
    if batches * size > len(facts):
        raise ValueError(f"eval.sequential: {batches} x {size} facts, but {dataset} "
                         f"{cfg.eval.split} has {len(facts)} distinct prompts")
    pools[dataset] = facts = facts[:batches * size]  # what `reference` reads
    measured = {r["method"] for r in records}
    for name, spec in methods.items():
        if name in measured:
            continue
        editor = editor_for(name, spec, model, tok, cfg)
        if isinstance(editor.method, Unedited):  # the behaviour every method ends against
            if baseline:
                records += [{"method": name, "dataset": dataset, "n": 0, "batch": 0,
                             "metric": k, "value": float(v)} for k, v in baseline[0].items()]
            continue
        behaviour = (lambda: behaviour_metrics(model, tok, drift, cfg, baseline[1])[0]) \
            if baseline else None
        for r in sequential(editor, reference(dataset, editor.lm.first), facts,
                            batches, size, cfg.eval.batch_size, behaviour, every):
            records += [{"method": name, "dataset": dataset, "n": r["n"], "batch": r["batch"],
                         "metric": k, "value": float(v)} for k, v in r.items()
                        if k not in ("n", "batch")]
        editor.method.restore()
        if save is not None:
            save(records)
    return records
