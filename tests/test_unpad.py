"""Unpadded execution (``unpad=True``): the encoder runs on the real tokens only.

References: a per-sequence Python loop for the index arithmetic; Hugging Face transformers'
``BertForPreTraining`` on the same weights (padded, eager attention) for the logits, with
right padding and with padding holes anywhere in the mask; our padded model for every parameter
gradient."""

from __future__ import annotations

import pytest
import torch

from bertrecipes.model import BertConfig, BertForPreTraining, pretraining_loss
from bertrecipes.model.bert import packed_rows, pad_rows, unpad_index, unpad_rows

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40)


def right_padded_mask(lengths, seq):
    return (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()


def holey_mask(seq=13):
    """Padding at the start, in the middle and at the end (what a left-padded or packed-by-hand
    batch looks like); every row keeps position 0 real so the pooler reads a real token."""
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[0, 5:9] = 0
    mask[1, 1:4] = 0
    mask[1, -2:] = 0
    mask[2, 7:] = 0
    return mask


def test_unpad_index_matches_a_per_sequence_loop():
    mask = holey_mask()
    layout = unpad_index(mask)
    want_indices, want_cu = [], [0]
    for b in range(mask.shape[0]):
        real = [b * mask.shape[1] + s for s in range(mask.shape[1]) if mask[b, s]]
        want_indices += real
        want_cu.append(want_cu[-1] + len(real))
    assert layout.indices.tolist() == want_indices
    assert layout.cu_seqlens.dtype == torch.int32 and layout.cu_seqlens.tolist() == want_cu
    assert layout.max_seqlen == int(mask.sum(1).max())
    x = torch.randn(3, 13, 5)
    packed = unpad_rows(x, layout)
    assert packed.shape == (int(mask.sum()), 5)
    back = pad_rows(packed, layout)
    torch.testing.assert_close(back, x * mask[..., None], rtol=0, atol=0)
    positions = torch.tensor([[0, 4, 9], [0, 4, 6], [0, 2, 6]])
    rows = packed_rows(layout, positions)
    torch.testing.assert_close(packed[rows], x[torch.arange(3)[:, None], positions], rtol=0, atol=0)


def test_unpad_index_rejects_a_wrong_rank():
    with pytest.raises(ValueError, match=r"\[batch, seq\].*\(2, 3, 4\)"):
        unpad_index(torch.ones(2, 3, 4))


def models(pre_layer_norm=False):
    cfg = transformers.BertConfig(**SMALL, hidden_act="gelu", attn_implementation="eager")
    torch.manual_seed(1)
    theirs = transformers.BertForPreTraining(cfg).eval()
    config = BertConfig(**SMALL, pre_layer_norm=pre_layer_norm)
    padded = BertForPreTraining(config).eval()
    unpadded = BertForPreTraining(config, unpad=True).eval()
    if not pre_layer_norm:
        state = {k: v for k, v in theirs.state_dict().items() if k in padded.state_dict()}
        padded.load_state_dict(state, strict=True)
    unpadded.load_state_dict(padded.state_dict())
    return theirs, padded, unpadded


@pytest.mark.parametrize("mask", [right_padded_mask([13, 8, 4], 13), holey_mask()], ids=["right", "holes"])
def test_unpadded_logits_equal_transformers(mask):
    theirs, _, ours = models()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, mask.shape, generator=g) * mask
    types = (torch.arange(mask.shape[1]) >= 6).long().expand_as(ids).contiguous()
    with torch.no_grad():
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
        mlm, nsp = ours(ids, types, mask)
    real = mask.bool()
    torch.testing.assert_close(mlm[real], ref.prediction_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    # the sequence output is zero at padding, the real tokens' hidden states elsewhere
    seq_out, _ = ours.bert(ids, types, mask)
    assert torch.count_nonzero(seq_out[~real]) == 0
    with torch.no_grad():
        ref_hidden = theirs.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(seq_out[real], ref_hidden[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_unpadded_loss_and_every_gradient_equal_padded(pre_layer_norm):
    _, padded, unpadded = models(pre_layer_norm)
    mask = right_padded_mask([13, 8, 4], 13)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 99, mask.shape, generator=g) * mask
    types = torch.zeros_like(ids)
    # row 2 has one real prediction and two padding predictions (position 0, label -100)
    positions = torch.tensor([[1, 5, 11], [2, 3, 7], [3, 0, 0]], dtype=torch.int32)
    labels = torch.tensor([[7, 8, 9], [10, 11, 12], [13, -100, -100]])
    nsp_labels = torch.tensor([0, 1, 1])
    results = []
    for model in (padded, unpadded):
        mlm, nsp = model(ids, types, mask, positions)
        loss, _, _ = pretraining_loss(mlm, nsp, labels, nsp_labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want_loss, want_grads), (loss, grads) = results
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_precomputed_layout_and_no_mask():
    _, padded, unpadded = models()
    mask = right_padded_mask([13, 8, 4], 13)
    ids = torch.randint(5, 99, mask.shape) * mask
    with torch.no_grad():
        want_mlm, want_nsp = padded(ids, None, mask)
        mlm, nsp = unpadded(ids, None, mask, unpadded=unpad_index(mask))
        real = mask.bool()  # the full-sequence MLM logits at padding come from zero rows
        torch.testing.assert_close(mlm[real], want_mlm[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nsp, want_nsp, atol=1e-5, rtol=1e-5)
        # no mask: nothing to unpad, the dense path runs
        torch.testing.assert_close(unpadded(ids, None, None), padded(ids, None, None), rtol=0, atol=0)


def test_dropout_runs_on_real_rows_only_and_ignores_padding_content():
    """In training mode the unpadded model never reads padding: changing the ids under padding
    changes nothing, with dropout on and the same seed."""
    config = BertConfig(**SMALL, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = BertForPreTraining(config, unpad=True).train()
    mask = right_padded_mask([13, 8, 4], 13)
    ids = torch.randint(5, 99, mask.shape, generator=torch.Generator().manual_seed(5))
    outs = []
    for fill in (0, 42):
        torch.manual_seed(7)
        outs.append(model(torch.where(mask.bool(), ids, fill), None, mask, torch.tensor([[1], [2], [3]]))[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(8)
    other_seed = model(ids * mask, None, mask, torch.tensor([[1], [2], [3]]))[0]
    assert not torch.equal(other_seed, outs[0])  # dropout is really on
