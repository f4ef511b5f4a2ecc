"""Build the safety-tuned test-bed model and measure it against its base.

    python scripts/align.py                      # builds smollm2-135m-instruct-safe (cached)
    python scripts/align.py recipe.lr=1e-5       # another recipe: model saved in the run folder
    python scripts/align.py evaluate=false

With the default recipe the model is the registry's `smollm2-135m-instruct-safe` (built once
into the cache, like `load_model("smollm2-135m-instruct-safe")` does). The run folder gets
behaviour.json (scores and responses of both models) and prints a table.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from chatedit.evaluation.behaviour import Limit, SuiteConfig, behaviour_suite
from chatedit.evaluation.report import markdown_table
from chatedit.files import write_json
from chatedit.models import load_model
from chatedit.safety.recipe import SafetyRecipe, build, safe_folder


@dataclass
class AlignConfig:
    recipe: SafetyRecipe = field(default_factory=SafetyRecipe)
    evaluate: bool = True
    eval: SuiteConfig = field(  # all IFEval and XSTest safe prompts, 256 tokens
        default_factory=lambda: SuiteConfig(ifeval=Limit(None), xstest=Limit(None),
                                            max_new_tokens=256, behaviour_batch_size=32))


ConfigStore.instance().store(name="align_schema", node=AlignConfig)  # conf/align.yaml


@hydra.main(config_path="pkg://chatedit.conf",
            config_name="align", version_base=None)
def main(cfg) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    recipe = SafetyRecipe(**OmegaConf.to_container(cfg.recipe))
    start = time.perf_counter()
    if recipe == SafetyRecipe():
        folder = safe_folder()
    else:
        model, tok = load_model(recipe.base)
        write_json(out / "recipe.json", build(model, tok, recipe))
        folder = out / "model"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    print(f"safety-tuned model: {folder} ({time.perf_counter() - start:.0f} s)")
    if not cfg.evaluate:
        return
    scores, responses = {}, {}
    for name, path in (("base", recipe.base), ("safe", str(folder))):
        model, tok = load_model(path)
        result = behaviour_suite(model, tok, cfg.eval)
        scores[name], responses[name] = result["scores"], result["responses"]
    write_json(out / "behaviour.json", {"config": OmegaConf.to_container(cfg.eval),
                                        "model": str(folder), "scores": scores,
                                        "responses": responses})
    keys = list(next(iter(scores.values())))
    print(markdown_table([{"model": n, **s} for n, s in scores.items()], ["model", *keys]))


if __name__ == "__main__":
    main()
