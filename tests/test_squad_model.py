"""BertForQuestionAnswering against transformers' on the same weights (names, logits, loss with
out-of-range positions), and its initialisation from a bertrecipes (DS) pre-training checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bertrecipes.checkpoint import CheckpointError, save_checkpoint
from bertrecipes.model import BertConfig, BertForPreTraining, unpad_index
from bertrecipes.squad.engine import build_model, load_initial_model
from bertrecipes.squad.model import PADDING_LOGIT, BertForQuestionAnswering, qa_loss

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40)


def batch(size: int = 3, seq: int = 17, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SMALL["vocab_size"], (size, seq), generator=g)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    mask = (torch.arange(seq)[None] < torch.tensor([seq, seq - 5, 9])[:size, None]).long()
    return ids * mask, types, mask


def hf_qa_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.BertConfig(**SMALL, hidden_act="gelu", attn_implementation="eager")
    return transformers.BertForQuestionAnswering(config).eval()


def test_same_parameter_names_as_transformers():
    theirs = {k for k in hf_qa_model().state_dict() if not k.endswith("position_ids")}
    assert set(BertForQuestionAnswering(BertConfig(**SMALL)).state_dict()) == theirs


def test_logits_and_loss_equal_transformers_on_the_same_weights():
    theirs = hf_qa_model()
    ours = BertForQuestionAnswering(BertConfig(**SMALL)).eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if not k.endswith("position_ids")})
    ids, types, mask = batch()
    # Positions beyond the sequence (17) are clamped to it and ignored, as in transformers.
    starts, ends = torch.tensor([3, 40, 0]), torch.tensor([5, 7, 17])
    with torch.no_grad():
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, start_positions=starts,
                     end_positions=ends)
        start_logits, end_logits = ours(ids, types, mask)
    torch.testing.assert_close(start_logits, ref.start_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end_logits, ref.end_logits, atol=1e-5, rtol=1e-5)
    loss = qa_loss(start_logits, end_logits, starts, ends)
    torch.testing.assert_close(loss, ref.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bucket", [0, 16])
def test_unpadded_model_scores_real_tokens_as_transformers_and_padding_out_of_the_softmax(bucket):
    """Exact or bucketed (``kernel.unpad_bucket``: filler rows, dropped from the logits)."""
    theirs = hf_qa_model()
    ours = BertForQuestionAnswering(BertConfig(**SMALL), unpad=True).eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if not k.endswith("position_ids")})
    ids, types, mask = batch()
    starts, ends = torch.tensor([3, 4, 0]), torch.tensor([5, 7, 8])
    layout = unpad_index(mask, bucket)
    assert bucket == 0 or layout.num_tokens % bucket == 0 and layout.num_tokens > mask.sum()
    with torch.no_grad():
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
        start_logits, end_logits = ours(ids, types, mask, unpadded=layout)
    real = mask.bool()
    torch.testing.assert_close(start_logits[real], ref.start_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end_logits[real], ref.end_logits[real], atol=1e-5, rtol=1e-5)
    assert (start_logits[~real] == PADDING_LOGIT).all() and (end_logits[~real] == PADDING_LOGIT).all()
    # the loss is transformers' logits with padding masked out of the softmax
    masked = [torch.where(real, t, torch.tensor(PADDING_LOGIT)) for t in (ref.start_logits, ref.end_logits)]
    torch.testing.assert_close(qa_loss(start_logits, end_logits, starts, ends),
                               qa_loss(*masked, starts, ends), atol=1e-6, rtol=1e-6)


def test_loss_is_the_mean_of_two_cross_entropies():
    start_logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    end_logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    starts, ends = torch.tensor([2, 0]), torch.tensor([0, 2])

    def ce(logits, target):
        return -(logits[target] - torch.logsumexp(logits, 0))

    expected = (sum(ce(start_logits[i], starts[i]) for i in range(2)) / 2
                + sum(ce(end_logits[i], ends[i]) for i in range(2)) / 2) / 2
    torch.testing.assert_close(qa_loss(start_logits, end_logits, starts, ends), expected)


def squad_cfg(**overrides):
    base = dict(model_file=None, ckpt_type="DS", origin_bert_config_file=None, vocab_file=None, dropout=0.1,
                max_seq_length=32, do_train=True, kernel={"name": "torch", "unpad": False},
                model=dict(SMALL, vocab_size=None, hidden_act="gelu", hidden_dropout_prob=0.1,
                           attention_probs_dropout_prob=0.1, type_vocab_size=2, initializer_range=0.02,
                           layer_norm_eps=1e-12, pre_layer_norm=False))
    base.update(overrides)
    return OmegaConf.create(base)


def pretraining_checkpoint(tmp_path: Path, **config) -> tuple[Path, BertForPreTraining]:
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**{**SMALL, **config}))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(f"[unused{i}]\n" for i in range(SMALL["vocab_size"])))
    save_checkpoint(tmp_path / "checkpoints", "global_step7",
                    state={"model": model.state_dict(), "model_config": model.config.to_dict()},
                    client_state={"vocab_file": str(vocab)})
    return tmp_path / "checkpoints", model


def test_ds_checkpoint_gives_the_encoder_its_config_and_vocab(tmp_path):
    checkpoint, pretrained = pretraining_checkpoint(tmp_path, pre_layer_norm=True, hidden_dropout_prob=0.0)
    initial = load_initial_model(squad_cfg(model_file=str(checkpoint)))
    assert initial.vocab_file == tmp_path / "vocab.txt" and initial.config.pre_layer_norm
    model = build_model(squad_cfg(model_file=str(checkpoint), dropout=0.13), initial, vocab_size=99)
    assert model.config.pre_layer_norm and model.config.hidden_dropout_prob == 0.13
    assert model.config.attention_probs_dropout_prob == 0.13
    theirs = pretrained.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith("bert."):
            assert torch.equal(value, theirs[name]), name
    assert not any(k.startswith(("cls.", "bert.pooler")) for k in model.state_dict())
    # The QA layer is new: initialised as BERT initialises linear layers.
    assert model.qa_outputs.bias.abs().max() == 0 and 0.005 < model.qa_outputs.weight.std() < 0.05


def test_dropout_null_keeps_the_checkpoints(tmp_path):
    checkpoint, _ = pretraining_checkpoint(tmp_path, hidden_dropout_prob=0.05)
    model = build_model(squad_cfg(model_file=str(checkpoint), dropout=None),
                        load_initial_model(squad_cfg(model_file=str(checkpoint))), vocab_size=99)
    assert model.config.hidden_dropout_prob == 0.05


def test_a_fine_tuned_checkpoint_brings_its_qa_layer(tmp_path):
    model = BertForQuestionAnswering(BertConfig(**SMALL))
    torch.nn.init.normal_(model.qa_outputs.bias)
    save_checkpoint(tmp_path, "global_step3", state={"model": model.state_dict(),
                                                     "model_config": model.config.to_dict()})
    cfg = squad_cfg(model_file=str(tmp_path))
    loaded = build_model(cfg, load_initial_model(cfg), vocab_size=99)
    assert torch.equal(loaded.qa_outputs.bias, model.qa_outputs.bias)


def test_mismatched_checkpoints_are_named(tmp_path):
    checkpoint, _ = pretraining_checkpoint(tmp_path)
    initial = load_initial_model(squad_cfg(model_file=str(checkpoint)))
    with pytest.raises(Exception, match="tokenizer has 120 tokens"):
        build_model(squad_cfg(model_file=str(checkpoint)), initial, vocab_size=120)
    with pytest.raises(Exception, match="exceeds the model's max_position_embeddings=40"):
        build_model(squad_cfg(model_file=str(checkpoint), max_seq_length=64), initial, vocab_size=99)
    initial.state_dict["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"state.pt does not match BertForQuestionAnswering.*layer\.9"):
        build_model(squad_cfg(model_file=str(checkpoint)), initial, vocab_size=99)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_initial_model(squad_cfg(model_file=str(tmp_path / "nowhere")))
