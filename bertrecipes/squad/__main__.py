"""SQuAD v1.1 fine-tuning entry point, composed by Hydra (conf/squad.yaml).

    python -m bertrecipes.squad train_file=train-v1.1.json predict_file=dev-v1.1.json \
        model_file=runs/seq512/checkpoints                        # a bertrecipes (DS) checkpoint
    python -m bertrecipes.squad ckpt_type=HF model_file=path/to/hf_bert ...      # Hugging Face
    python -m bertrecipes.squad ckpt_type=TF model_file=bert_model.ckpt \
        origin_bert_config_file=bert_config.json vocab_file=vocab.txt ...         # Google BERT
    python -m bertrecipes.squad do_train=false model_file=runs/squad/.../checkpoints ...  # predict only

Every knob is a command-line override; see conf/squad.yaml.
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bertrecipes.config import check_command_line, config_dir
from bertrecipes.squad.config import register_squad_configs
from bertrecipes.squad.engine import run_and_report

CONFIG_DIR = config_dir()

register_squad_configs()
log = logging.getLogger("bertrecipes")


@hydra.main(config_path=CONFIG_DIR, config_name="squad", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Hydra's run directory is output_dir (output_dir/<job number> in a sweep): keep every file there.
    output_dir = HydraConfig.get().runtime.output_dir
    cfg.output_dir = output_dir
    summary = run_and_report(cfg, output_dir)
    if summary:
        scores = summary.get("eval", {})
        log.info("done: %d training steps; exact_match %s, f1 %s; outputs in %s", summary["global_step"],
                 scores.get("exact_match"), scores.get("f1"), summary["output_dir"])


if __name__ == "__main__":
    check_command_line("squad")
    main()
