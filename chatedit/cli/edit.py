"""Edit facts in a chat model and show its answers before and after.

    python scripts/edit.py                                 # embedded model, 4 zsRE test facts
    python scripts/edit.py facts=my_facts.jsonl save_edits=my-edits
    python scripts/edit.py editor_checkpoint=outputs/train/.../checkpoint.safetensors
    python scripts/edit.py editor_checkpoint=null          # fine-tuning baseline

With `editor_checkpoint=auto` a quick MALMEN editor for the model is meta-trained once (a
few minutes on a CPU: `Editor.quick`, or `quick_train` overrides of scripts/train.py) and
cached. Writes answers.json (and the saved edits/model if asked) into the hydra run folder.
"""

import json
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from chatedit import Editor
from chatedit.api import EDITS_FILE
from chatedit.chat import describe
from chatedit.data import load_facts
from chatedit.files import check_folder, write_atomic

def table(rows: list[dict]) -> str:
    lines = [f"{'':<10} {'prompt':<46} {'wanted':<18} {'before':<34} after"]
    for r in rows:
        lines.append(f"{r['kind']:<10} {r['prompt'][:44]:<46} {(r['target'] or '-')[:16]:<18} "
                     f"{r['before'][:32]!r:<34} {r['after'][:48]!r}")
    return "\n".join(lines)


@hydra.main(config_path="pkg://chatedit.conf",
            config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    t0 = time.time()
    for where in (cfg.save_edits, cfg.save_model):  # a path we cannot write: fail before work
        if where:
            check_folder(where)
    saved = Path(cfg.save_edits or "") / EDITS_FILE
    if cfg.save_edits and saved.exists() and not cfg.load_edits and not cfg.save_edits_overwrite:
        raise FileExistsError(f"{saved} holds earlier edits that this run does not load; saving "
                              "would lose them: add load_edits=<that folder> (the new facts go "
                              "on top), save elsewhere, or set save_edits_overwrite=true")
    if cfg.facts:
        facts = load_facts(str(cfg.facts), split="all", limit=cfg.n_facts)
    else:
        facts = load_facts(cfg.data.name, split=cfg.split, val_size=cfg.data.val_size,
                           seed=cfg.data.seed, limit=cfg.n_facts)
    system = cfg.model.system_prompt
    if cfg.editor_checkpoint == "auto":
        quick = cfg.quick_train and list(cfg.quick_train)
        ed = Editor.quick(cfg.model.name, cfg.data.name, quick, system=system)
    elif cfg.editor_checkpoint:
        ed = Editor.from_pretrained(cfg.model.name, cfg.editor_checkpoint, system=system)
    else:
        ed = Editor.from_pretrained(cfg.model.name, system=system, module=cfg.model.edit.module,
                                    layers=list(cfg.model.edit.layers))
    print(f"loaded {cfg.model.name} with editor {ed.checkpoint_path or 'FT baseline'}; edited "
          f"modules: {', '.join(ed.modules)} ({time.time() - t0:.0f}s)")
    if cfg.load_edits:  # an earlier session's edits: the new facts go on top of them
        ed.load_edits(cfg.load_edits)
        print(f"applied {len(ed.history)} saved batch(es) from {cfg.load_edits}")
    if cfg.show_format:
        f = facts[0]
        print(f"\nchat formatting of {f['prompt']!r} -> {f['target']!r}:")
        print(describe(ed.tokenizer, ed.lm.encode(f["prompt"], f["target"])))

    rows = [{"kind": "fact", "prompt": f["prompt"], "target": f["target"]} for f in facts]
    rows += [{"kind": "rephrase", "prompt": f["rephrases"][0], "target": f["target"]}
             for f in facts if f["rephrases"]]
    rows += [{"kind": "unrelated", "prompt": p, "target": None} for p in cfg.unrelated]
    prompts = [r["prompt"] for r in rows]
    for r, a in zip(rows, ed.generate(prompts, cfg.max_new_tokens)):
        r["before"] = a
    result = ed.edit(list(facts))
    for r, a in zip(rows, ed.generate(prompts, cfg.max_new_tokens)):
        r["after"] = a
    print(f"\n{result}\n\n{table(rows)}")

    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "answers.json", json.dumps(rows, indent=2))
    if cfg.save_edits:
        print(f"saved edits to {ed.save_edits(cfg.save_edits, cfg.save_edits_overwrite)}")
    if cfg.save_model:
        ed.save_pretrained(cfg.save_model)
        print(f"saved the edited model to {cfg.save_model}")
    print(f"\nwrote {out / 'answers.json'} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
