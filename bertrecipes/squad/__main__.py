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
from typing import Any

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
        log.info("%s", done_line(cfg, summary))


def done_line(cfg: DictConfig, summary: dict[str, Any]) -> str:
    """The run's last log line: what it did (fine-tuned, or predicted with a model fine-tuned before),
    its scores when the predict file has answers, and where its outputs are."""
    steps = summary["global_step"]
    if cfg.do_train:
        what = f"fine-tuned for {steps} steps" + (", then predicted" if cfg.do_predict else "")
    elif steps:
        what = f"predicted with a model fine-tuned for {steps} steps (no training in this run)"
    else:
        what = "predicted (no training in this run)"
    scores = summary.get("eval") or {}
    if "exact_match" in scores:
        what += f"; exact_match {scores['exact_match']:.2f}, f1 {scores['f1']:.2f}"
    elif scores:
        what += "; not scored (the predict file has no answers)"
    return f"done: {what}; outputs in {summary['output_dir']}"


if __name__ == "__main__":
    check_command_line("squad")
    main()
