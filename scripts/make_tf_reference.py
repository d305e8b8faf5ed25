"""Regenerate the TensorFlow reference fixtures of the checkpoint-import tests.

The pure-Python bundle reader (``bertrecipes.interop.tf_bundle``) is tested against what TensorFlow
itself reads, so this script needs TensorFlow; keep it out of the project's environment::

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    /tmp/tfvenv/bin/python scripts/make_tf_reference.py            # from the repository root

It writes, under ``tests/fixtures/``:

* ``tf_bert_tiny_reference.npz``: every variable of ``../shared/data/tf_bert_tiny/bert_model.ckpt``
  (a TF 1.x BERT checkpoint: weights, Adam slots, ``global_step``) as ``tf.train.load_checkpoint``
  returns it, keyed by the TF variable name, plus ``__tf_version__``;
* ``tf_dtypes/model.ckpt.{index,data-00000-of-00001}``: a bundle written by TensorFlow's own
  ``SaveV2`` op with one tensor per dtype the reader supports, an empty tensor, a string tensor and
  enough small variables under one name prefix that the index spans several SSTable blocks;
* ``tf_dtypes_reference.npz``: that bundle read back with ``tf.train.load_checkpoint`` (bfloat16
  stored as float32, which holds every bfloat16 value exactly).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_TF_CKPT = ROOT.parent / "shared" / "data" / "tf_bert_tiny" / "bert_model.ckpt"
FIXTURES = ROOT / "tests" / "fixtures"


def dump_checkpoint(tf, prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    arrays = {}
    for name in sorted(reader.get_variable_to_shape_map()):
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.name == "bfloat16":  # npz cannot hold ml_dtypes' bfloat16; float32 is exact
            value = value.astype(np.float32)
        arrays[name] = value
    return arrays


def dtype_tensors(tf) -> dict[str, object]:
    rng = np.random.default_rng(0)
    tensors = {
        "dtypes/float32": tf.constant(rng.standard_normal((3, 5)).astype(np.float32)),
        "dtypes/float64": tf.constant(rng.standard_normal((2, 3))),
        "dtypes/float16": tf.constant(rng.standard_normal((4, 3)).astype(np.float16)),
        "dtypes/bfloat16": tf.cast(tf.constant(rng.standard_normal((3, 4)).astype(np.float32)), tf.bfloat16),
        "dtypes/int32": tf.constant(rng.integers(-1000, 1000, (7,)).astype(np.int32)),
        "dtypes/int64": tf.constant(rng.integers(-(2**40), 2**40, (2, 2)).astype(np.int64)),
        "dtypes/int8": tf.constant(rng.integers(-128, 128, (5,)).astype(np.int8)),
        "dtypes/uint8": tf.constant(rng.integers(0, 256, (5,)).astype(np.uint8)),
        "dtypes/bool": tf.constant(rng.integers(0, 2, (6,)).astype(bool)),
        "dtypes/empty": tf.zeros((0, 4), tf.float32),
        "global_step": tf.constant(1234, tf.int64),
        "strings/names": tf.constant(["a", "bc"]),
    }
    # Many entries sharing a long prefix: the index then needs several 4 KiB blocks, each with
    # prefix-compressed keys and restart points.
    for i in range(150):
        tensors[f"encoder/block_{i:03d}/kernel"] = tf.constant(rng.standard_normal((2,)).astype(np.float32))
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-checkpoint", default=str(SHARED_TF_CKPT), help="TF BERT checkpoint prefix")
    parser.add_argument("--out", default=str(FIXTURES), help="fixtures directory")
    args = parser.parse_args()

    import tensorflow as tf  # imported here so --help works without TensorFlow

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    version = np.array(tf.__version__)

    bert = dump_checkpoint(tf, args.tf_checkpoint)
    np.savez_compressed(out / "tf_bert_tiny_reference.npz", __tf_version__=version, **bert)
    print(f"{len(bert)} variables of {args.tf_checkpoint} -> {out / 'tf_bert_tiny_reference.npz'}")

    bundle_dir = out / "tf_dtypes"
    shutil.rmtree(bundle_dir, ignore_errors=True)
    bundle_dir.mkdir()
    prefix = str(bundle_dir / "model.ckpt")
    tensors = dtype_tensors(tf)
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tensors[n] for n in names])
    reference = dump_checkpoint(tf, prefix)
    reference["strings/names"] = reference["strings/names"].astype("U")
    np.savez_compressed(out / "tf_dtypes_reference.npz", __tf_version__=version, **reference)
    print(f"{len(reference)} variables -> {bundle_dir} and {out / 'tf_dtypes_reference.npz'} "
          f"(TensorFlow {tf.__version__})")


if __name__ == "__main__":
    main()
