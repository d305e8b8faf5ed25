"""Export a BERT checkpoint as a Hugging Face model directory (config, safetensors, tokenizer files).

    python -m bertrecipes.export_hf runs/demo1/checkpoints hf_bert/           # our checkpoint
    python -m bertrecipes.export_hf runs/squad/checkpoints hf_squad/ --architecture qa
    python -m bertrecipes.export_hf uncased_L-12_H-768_A-12/bert_model.ckpt hf_bert/ --ckpt-type TF

Then ``transformers.BertForPreTraining.from_pretrained("hf_bert")`` (``BertForQuestionAnswering``
for ``qa``) and ``BertTokenizer.from_pretrained("hf_bert")``. Pre-LN models cannot be exported
(Hugging Face's BERT is post-LN). See :mod:`bertrecipes.interop.export`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from bertrecipes.errors import UserError
from bertrecipes.interop import CKPT_TYPES, export_hf
from bertrecipes.interop.export import ARCHITECTURES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bertrecipes.export_hf",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint path (a run's checkpoints/ dir, a tag dir, state.pt; "
                                           "a DeepSpeed save or tag dir, an NVIDIA ckpt_<step>.pt or its "
                                           "directory; an HF directory; a TF checkpoint prefix)")
    parser.add_argument("out_dir", help="directory to create")
    parser.add_argument("--ckpt-type", default="DS", type=str.upper, choices=CKPT_TYPES,
                        help="format of CHECKPOINT (default: DS: bertrecipes', DeepSpeed's or NVIDIA's "
                             "PyTorch checkpoints)")
    parser.add_argument("--origin-bert-config-file", help="bert_config.json/config.json, if not beside it")
    parser.add_argument("--vocab-file", help="vocab.txt (default: the checkpoint's own)")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES),
                        help="HF class to export as (default: qa if the checkpoint has qa_outputs, "
                             "else pretraining)")
    parser.add_argument("--do-lower-case", action=argparse.BooleanOptionalAction, default=None,
                        help="tokenizer lower-casing (default: the run's data.lower_case, else inferred "
                             "from the vocab)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_hf(args.checkpoint, args.out_dir, ckpt_type=args.ckpt_type, vocab_file=args.vocab_file,
                        architecture=args.architecture, do_lower_case=args.do_lower_case,
                        origin_bert_config_file=args.origin_bert_config_file, force=args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
