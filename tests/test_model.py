"""The BERT model against independent references: Hugging Face transformers on the same weights
(post-LN), a float64 functional re-implementation (pre-LN), and PyTorch's FLOP counter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bertrecipes.model import BertConfig, BertForPreTraining, pretraining_loss, training_flops_per_sample

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40)


def padded_batch(batch: int = 3, seq: int = 17, vocab: int = 99, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    types = torch.zeros_like(ids)
    types[:, seq // 2:] = 1
    lengths = torch.tensor([seq, seq - 5, 4])[:batch]
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids * mask
    return ids, types, mask


def hf_model():
    cfg = transformers.BertConfig(**SMALL, hidden_act="gelu", attn_implementation="eager")
    torch.manual_seed(1)
    return transformers.BertForPreTraining(cfg).eval()


def test_names_are_hugging_face_names():
    ours = BertForPreTraining(BertConfig(**SMALL))
    theirs = hf_model()
    ours_keys = set(ours.state_dict())
    theirs_keys = {k for k in theirs.state_dict() if not k.endswith("position_ids")}
    # HF keeps the tied MLM bias under two names; ours keeps it once.
    assert ours_keys == theirs_keys - {"cls.predictions.decoder.bias"}


def test_logits_equal_transformers_on_same_weights_with_padding():
    theirs = hf_model()
    ours = BertForPreTraining(BertConfig(**SMALL)).eval()
    state = {k: v for k, v in theirs.state_dict().items() if k in ours.state_dict()}
    ours.load_state_dict(state, strict=True)
    ids, types, mask = padded_batch()
    with torch.no_grad():
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
        mlm, nsp = ours(ids, types, mask)
    real = mask.bool()
    torch.testing.assert_close(mlm[real], ref.prediction_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=1e-5, rtol=1e-5)


def test_mlm_head_at_masked_positions_equals_full_head_gathered():
    model = BertForPreTraining(BertConfig(**SMALL)).eval()
    ids, types, mask = padded_batch()
    positions = torch.tensor([[1, 5, 9], [0, 2, 3], [1, 2, 0]])
    with torch.no_grad():
        full, nsp_full = model(ids, types, mask)
        gathered, nsp = model(ids, types, mask, masked_lm_positions=positions)
    expected = torch.stack([full[b, positions[b]] for b in range(3)])
    torch.testing.assert_close(gathered, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(nsp, nsp_full)


def test_decoder_tied_to_word_embeddings():
    model = BertForPreTraining(BertConfig(**SMALL))
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def _reference_pre_ln(model: BertForPreTraining, ids, types, mask):
    """float64 functional pre-LN BERT written from the formulas, reading the model's weights."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    eps = cfg.layer_norm_eps

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps)

    def lin(x, name):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    seq = ids.shape[1]
    emb = "bert.embeddings."
    x = (p[emb + "word_embeddings.weight"][ids] + p[emb + "position_embeddings.weight"][:seq]
         + p[emb + "token_type_embeddings.weight"][types])
    x = ln(x, "bert.embeddings.LayerNorm")
    nh, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    bias = torch.where(mask.bool()[:, None, None, :], 0.0, -math.inf).double()
    for i in range(cfg.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}."
        h = ln(x, pre + "attention.output.LayerNorm")
        q, k, v = (lin(h, pre + f"attention.self.{n}").view(*h.shape[:2], nh, hd).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(h.shape)
        x = x + lin(ctx, pre + "attention.output.dense")
        h = ln(x, pre + "output.LayerNorm")
        h = lin(h, pre + "intermediate.dense")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + lin(h, pre + "output.dense")
    x = ln(x, "bert.encoder.FinalLayerNorm")
    pooled = torch.tanh(lin(x[:, 0], "bert.pooler.dense"))
    t = lin(x, "cls.predictions.transform.dense")
    t = ln(0.5 * t * (1 + torch.erf(t / math.sqrt(2))), "cls.predictions.transform.LayerNorm")
    mlm = t @ p["bert.embeddings.word_embeddings.weight"].T + p["cls.predictions.bias"]
    return mlm, lin(pooled, "cls.seq_relationship")


def test_pre_layer_norm_matches_float64_reference():
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**SMALL, pre_layer_norm=True)).eval()
    # Non-trivial LayerNorm parameters so a misplaced LayerNorm cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    assert "bert.encoder.FinalLayerNorm.weight" in model.state_dict()
    ids, types, mask = padded_batch()
    with torch.no_grad():
        mlm, nsp = model(ids, types, mask)
    ref_mlm, ref_nsp = _reference_pre_ln(model, ids, types, mask)
    real = mask.bool()
    torch.testing.assert_close(mlm[real].double(), ref_mlm[real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(nsp.double(), ref_nsp, atol=2e-5, rtol=1e-5)


def test_pretraining_loss_ignores_padding_predictions():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    nsp_logits = torch.randn(2, 2)
    nsp_labels = torch.tensor([0, 1])
    total, mlm, nsp = pretraining_loss(logits, nsp_logits, labels, nsp_labels)
    logp = torch.log_softmax(logits.double(), -1)
    expected_mlm = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[1, 0, 3]) / 3
    expected_nsp = -(torch.log_softmax(nsp_logits.double(), -1)[[0, 1], [0, 1]]).mean()
    assert mlm.item() == pytest.approx(expected_mlm.item(), rel=1e-6)
    assert nsp.item() == pytest.approx(expected_nsp.item(), rel=1e-6)
    assert total.item() == pytest.approx((expected_mlm + expected_nsp).item(), rel=1e-6)


@pytest.mark.parametrize("shape", [
    dict(hidden=64, layers=2, heads=4, inter=256, vocab=96, seq=16, preds=4),
    dict(hidden=48, layers=3, heads=3, inter=80, vocab=131, seq=23, preds=7),
])
def test_training_flops_equal_pytorchs_flop_counter(shape):
    """The analytic count behind TFLOP/s and MFU equals what torch.utils.flop_counter counts for one
    real forward + backward of the model (every matmul, attention included, gradients of both
    operands), on a padded batch."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = BertConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                     num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                     intermediate_size=shape["inter"],
                     max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg)
    batch, seq, preds = 3, shape["seq"], shape["preds"]
    ids, types, mask = padded_batch(batch, seq, shape["vocab"])
    positions = torch.randint(1, 4, (batch, preds))
    labels = torch.randint(0, shape["vocab"], (batch, preds))
    with FlopCounterMode(display=False) as counter:
        mlm_logits, nsp_logits = model(ids, types, mask, positions)
        loss, _, _ = pretraining_loss(mlm_logits, nsp_logits, labels, torch.tensor([0, 1, 0]))
        loss.backward()
    assert counter.get_total_flops() == batch * training_flops_per_sample(cfg, seq, preds)


def test_qa_training_flops_equal_pytorchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from bertrecipes.squad.model import BertForQuestionAnswering, qa_loss, qa_training_flops_per_sample

    cfg = BertConfig(**SMALL)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(cfg)
    ids, types, mask = padded_batch(3, 17)
    with FlopCounterMode(display=False) as counter:
        start_logits, end_logits = model(ids, types, mask)
        qa_loss(start_logits, end_logits, torch.tensor([1, 2, 3]), torch.tensor([2, 2, 3])).backward()
    assert counter.get_total_flops() == 3 * qa_training_flops_per_sample(cfg, 17)
