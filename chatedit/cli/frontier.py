"""The edit / locality frontier on the validation split (chatedit.evaluation.frontier).

    python scripts/frontier.py checkpoint=outputs/train/.../checkpoint.safetensors
    python scripts/frontier.py checkpoint=P '+editors.out100={out_mu: 100.0}'
    python scripts/frontier.py model=smollm2-135m-instruct-safe checkpoint=P ns=[1024]

Every editor of `editors` (name -> test-time options, and optionally its own `checkpoint`;
the default one is `checkpoint` as trained) is traced by its step size (`step_scales`, a
multiplier of its own) at each N of `ns`. Writes frontier.json (one record per editor x N x
step_scale x metric, plus the config and the unedited model's values), frontier.md and
frontier.png into the hydra run folder, rewritten after each point; run again with
`hydra.run.dir=<its folder>` and the same settings, it resumes (editors, N and step scales
may be added; what the folder holds is not measured again).
"""

import json
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from chatedit import Editor
from chatedit.data import load_facts
from chatedit.evaluation.frontier import Refusals, plot_frontier, trace
from chatedit.evaluation.panel import Probes, nested, panel_rows
from chatedit.evaluation.report import markdown_table
from chatedit.files import write_atomic, write_json
from chatedit.models import load_model

COLUMNS = ["editor", "n", "step_scale", "ES", "ES_strict", "GS", "LS_subject", "LS_neighbour",
           "NS", "LS_NQ", "chat_8", "chat_32", "refusal", "edit_seconds"]


def table(records: list[dict]) -> str:
    rows = {}
    for r in records:
        key = (r["editor"], r["n"], r["step_scale"])
        rows.setdefault(key, dict(zip(("editor", "n", "step_scale"), key)))[r["metric"]] = \
            r["value"]
    return markdown_table(list(rows.values()), COLUMNS)


@hydra.main(config_path="pkg://chatedit.conf", config_name="frontier", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    start, out = time.perf_counter(), Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.checkpoint and any(not e or "checkpoint" not in e for e in cfg.editors.values()):
        raise ValueError("frontier: set checkpoint=<an editor checkpoint.safetensors> (or give "
                         "every editor its own checkpoint)")
    path, records = out / "frontier.json", []
    if path.exists():  # a stopped run in this folder resumes
        saved = json.loads(path.read_text())
        changed = {k for k in config if k not in ("editors", "step_scales", "ns")
                   and saved["config"].get(k) != config[k]}
        if changed:
            raise ValueError(f"{path} holds another frontier (config differs in: "
                             f"{', '.join(sorted(changed))}); use a new run folder")
        records = [r for r in saved["records"]
                   if saved["config"]["editors"].get(r["editor"]) == config["editors"].get(
                       r["editor"])]
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.device,
                            chat_template=cfg.model.chat_template)
    system = cfg.model.system_prompt
    facts = load_facts(cfg.data.name, "validation", val_size=cfg.data.val_size,
                       seed=cfg.data.seed, limit=max(cfg.ns))
    rows, cached = panel_rows(model, tok, facts, system), {}
    probes = Probes(model, tok, "validation", system, cfg.batch_size)
    refusals = Refusals(model, tok, system, cfg.refusal.prompts, cfg.refusal.tokens,
                        cfg.batch_size)
    unedited = {**probes(), **refusals()}
    print("unedited: " + ", ".join(f"{k} {v:.3f}" for k, v in unedited.items()))

    def save(part, name):
        write_json(path, {"config": config, "unedited": unedited,
                          "records": records + [{"editor": name, **r} for r in part],
                          "seconds": time.perf_counter() - start})

    for name, spec in cfg.editors.items():
        spec = dict(spec or {})
        ckpt = spec.pop("checkpoint", None) or cfg.checkpoint
        editor = Editor.from_pretrained(model, ckpt, tokenizer=tok, system=system,
                                        **spec).method
        if editor.first not in cached:
            cached[editor.first] = {k: nested(lambda rs, lm=editor.lm: lm.with_hidden(
                rs, cfg.batch_size, progress=True), r) for k, r in rows.items()}
        done = {(r["n"], r["step_scale"]) for r in records if r["editor"] == name}
        print(f"editor {name}: {ckpt} {spec or ''}")
        part = trace(editor, cached[editor.first], list(cfg.ns), list(cfg.step_scales),
                     probes, refusals, done, lambda part, name=name: save(part, name))
        records += [{"editor": name, **r} for r in part]
        editor.restore()
    save([], None)
    write_atomic(out / "frontier.md", table(records) + "\n")
    plot_frontier(records, unedited, out / "frontier.png")
    print(f"\n{table(records)}\n\nwrote {path} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
