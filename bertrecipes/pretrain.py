"""BERT pre-training entry point (MLM + NSP), composed by Hydra.

    python -m bertrecipes.pretrain                       # CPU demo: bert_tiny on the embedded corpus
    python -m bertrecipes.pretrain +phase=seq128         # DeepSpeed's recipe, phase 1
    python -m bertrecipes.pretrain +phase=seq512 init_from=runs/.../checkpoints   # phase 2
    python -m bertrecipes.pretrain output_dir=runs/x resume=true                  # continue a run
    python -m bertrecipes.pretrain -m optimizer.lr=3e-3,5e-3 seed=1,2             # a sweep

Every knob is a command-line override; see conf/ and README.md.
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bertrecipes.config import check_command_line, config_dir, register_configs
from bertrecipes.engine import run_and_report

CONFIG_DIR = config_dir()

register_configs()
log = logging.getLogger("bertrecipes")


@hydra.main(config_path=CONFIG_DIR, config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Hydra's run directory is output_dir itself, or output_dir/<job number> in a sweep; reading it
    # back (rather than re-resolving ${now:...}) keeps every file of the run in one place.
    output_dir = HydraConfig.get().runtime.output_dir
    cfg.output_dir = output_dir
    summary = run_and_report(cfg, output_dir)
    if summary:
        log.info("done: step %d, last metrics %s; outputs in %s", summary["global_step"],
                 summary["last_metrics"], summary["output_dir"])


if __name__ == "__main__":
    check_command_line("pretrain")
    main()
