"""Show facts through the chat template and the model's current answers.

    python scripts/edit.py                      # embedded model, 4 zsRE test facts
    python scripts/edit.py model=tiny-gpt2 n_facts=2
    python scripts/edit.py facts=my_facts.jsonl

Writes answers.json into the hydra run folder.
"""

import json
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from editor.chat import describe, encode_pair, generate
from editor.data import load_facts
from editor.models import edit_modules, load_model


@hydra.main(config_path="../conf", config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    t0 = time.time()
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype,
                            chat_template=cfg.model.chat_template)
    modules = edit_modules(model, cfg.model.edit.module, list(cfg.model.edit.layers))
    print(f"loaded {cfg.model.name} in {time.time() - t0:.1f}s; edited modules: "
          f"{', '.join(modules)}")

    if cfg.facts:
        facts = load_facts(str(cfg.facts), split="all", limit=cfg.n_facts)
    else:
        facts = load_facts(cfg.data.name, split=cfg.split, val_size=cfg.data.val_size,
                           seed=cfg.data.seed, limit=cfg.n_facts)

    system = cfg.model.system_prompt
    first = facts[0]
    print(f"\nchat formatting of the first fact ({first['prompt']!r} -> {first['target']!r}):")
    print(describe(tok, encode_pair(tok, first["prompt"], first["target"], system)))

    prompts = [f["prompt"] for f in facts] + [f["rephrases"][0] for f in facts if f["rephrases"]]
    prompts += list(cfg.unrelated)
    answers = generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, system=system,
                       progress=True)
    targets = {f["prompt"]: f["target"] for f in facts}
    targets.update({f["rephrases"][0]: f["target"] for f in facts if f["rephrases"]})
    rows = [{"prompt": p, "target": targets.get(p), "answer": a} for p, a in zip(prompts, answers)]

    print(f"\n{'prompt':<60} {'wanted':<22} model's answer")
    for r in rows:
        print(f"{r['prompt'][:58]:<60} {(r['target'] or '-')[:20]:<22} {r['answer'][:80]!r}")
    out = Path(HydraConfig.get().runtime.output_dir) / "answers.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
