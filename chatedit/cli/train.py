"""Meta-train an editor and check it on held-out test facts edited at once.

    python scripts/train.py                                   # MALMEN, chat locality
    python scripts/train.py editor=mend locality=nq train.steps=100
    python scripts/train.py editor=ft                          # baseline: evaluate only
    python scripts/train.py hydra.run.dir=<old run folder>     # resume a killed run

The run (chatedit.training.run) writes checkpoint.safetensors, history.jsonl, curves.png and
metrics.json into the hydra run folder, beside hydra's own record of the config.
"""

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from chatedit.training.config import register
from chatedit.training.run import run

register()  # the train, locality and editor groups (typed, in chatedit.training.config)


@hydra.main(config_path="pkg://chatedit.conf",
            config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
