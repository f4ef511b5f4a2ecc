"""Evaluate editors as the number of facts edited at once grows (chatedit.evaluation.suite).

    python scripts/evaluate.py                                   # conf/eval/default.yaml
    python scripts/evaluate.py model=smollm2-135m-instruct-safe \\
        methods.malmen-chat.checkpoint=outputs/train/.../checkpoint.safetensors
    python scripts/evaluate.py eval=full
    python scripts/evaluate.py '+methods.x2={rule:malmen,checkpoint:P,step_scale:2.0}'
    python scripts/evaluate.py 'eval.sequential={batches:10,size:100}'   # lifelong: retention.png

Writes results.json (one record per method x N x dataset x metric, plus the config),
results.md (with the behaviour change against the unedited model) and results.png into the
hydra run folder; both files are rewritten after each method, so a stopped run keeps the
methods and N it finished; run again with the same overrides and
`hydra.run.dir=<its folder>`, it resumes (what results.json holds is not measured again);
methods may be added, removed or changed then (a changed one is measured again).
"""

import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from chatedit.evaluation.config import register
from chatedit.evaluation.report import report
from chatedit.evaluation.suite import evaluate, finished, plot_results, save_results

register()  # the eval group (typed, in chatedit.evaluation.config)


@hydra.main(config_path="pkg://chatedit.conf",
            config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    out = Path(HydraConfig.get().runtime.output_dir)

    config = OmegaConf.to_container(cfg, resolve=True)
    done = finished(out / "results.json", config)  # a stopped run in this folder resumes

    def save(records):
        save_results({"config": config, "records": records,
                      "seconds": time.perf_counter() - start}, out / "results.json")

    records = evaluate(cfg, save, done)
    plot_results(records, out / "results.png", out / "retention.png")
    seconds = time.perf_counter() - start
    print(f"\n{report(records)}\n\nwrote {out / 'results.json'} ({seconds:.0f}s)")


if __name__ == "__main__":
    main()
