"""Prepare pre-training data (raw text -> MLM/NSP instance shards), composed by Hydra like pretrain.

    python -m bertrecipes.prepare_data data=text_files data.paths=[corpus/] \
        data.vocab_file=vocab.txt +phase=seq128          # then +phase=seq512 reuses the tokenization
    python -m bertrecipes.prepare_data data=wikipedia_bookcorpus data.vocab_file=vocab.txt +phase=seq128
    python -m bertrecipes.prepare_data data=nvidia_hdf5 data.input_dir=hdf5/ data.vocab_file=vocab.txt

It composes the same conf/pretrain.yaml as training, so the overrides that select data for a training
run prepare exactly that data; training with the same overrides then finds it in the cache
(``data.cache_dir``). Prints where the shards are and what they hold. Logs go to
``<data.cache_dir>/logs/`` rather than a run directory.
"""

from __future__ import annotations

import logging
import sys
import time

import hydra
from omegaconf import DictConfig

from bertrecipes.config import check_command_line, config_dir, register_configs
from bertrecipes.data.build import prepare_data
from bertrecipes.errors import UserError

CONFIG_DIR = config_dir()

register_configs()
log = logging.getLogger("bertrecipes")


def _default_overrides(argv: list[str]) -> list[str]:
    # pretrain.yaml puts Hydra's files in the run's output_dir; preparing data is not a run.
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append("hydra.run.dir=${data.cache_dir}/logs/prepare_data/${now:%Y-%m-%d_%H-%M-%S}")
    return extra


@hydra.main(config_path=CONFIG_DIR, config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    try:
        prepared = prepare_data(cfg)
    except UserError as e:  # bad input: one line naming it, no traceback
        log.error("%s", e)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # finished chunks are kept: the same command continues from them
        log.error("interrupted; run the same command again to continue where it stopped")
        raise SystemExit(130) from None
    manifest = prepared.manifest
    stats = manifest.get("stats", {})
    print(f"prepared data: {prepared.directory}" + (" (reused from the cache)" if prepared.reused else ""))
    if manifest:
        print(
            f"  instances {manifest['num_instances']:,}  max_seq_length {manifest['max_seq_length']}  "
            f"max_predictions_per_seq {manifest['max_predictions_per_seq']}  masking "
            f"{manifest.get('masking', 'static')}  vocab {manifest.get('vocab_source')} "
            f"(sha256 {str(manifest.get('vocab_sha256'))[:12]}...)"
        )
    if stats.get("tokens"):
        read = stats.get("read", {})
        print(
            f"  documents {stats['documents']:,}  sentences {stats['sentences']:,}  corpus tokens "
            f"{stats['tokens']:,}  instance tokens {stats['instance_tokens']:,}  input "
            f"{read.get('input_bytes', 0) / 1e6:,.1f} MB"
        )
    print(f"  {time.perf_counter() - start:.1f}s. Train on it with the same data=/phase overrides.")


if __name__ == "__main__":
    check_command_line("pretrain")
    sys.argv += _default_overrides(sys.argv[1:])
    main()
