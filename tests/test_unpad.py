"""Unpadded execution (``unpad=True``): the encoder runs on the real tokens only.

References: a per-sequence Python loop for the index arithmetic; Hugging Face transformers'
``BertForPreTraining`` on the same weights (padded, eager attention) for the logits, with
right padding and with padding holes anywhere in the mask; our padded model for every parameter
gradient."""

from __future__ import annotations

import pytest
import torch

from bertrecipes.model import BertConfig, BertForPreTraining, pretraining_loss
from bertrecipes.model.bert import packed_rows, pad_rows, scatter_rows, unpad_index, unpad_rows

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
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=rf"non-negative int.*{bad!r}"):
            unpad_index(torch.ones(2, 3), bad)


@pytest.mark.parametrize("bucket", [1, 5, 16, 13, 40])
def test_bucketed_index_pads_the_packed_rows_to_a_multiple_with_filler_sequences(bucket):
    """The real rows are the exact layout's; then filler up to the next multiple of the bucket, in
    sequences of at most S rows that come after the real ones; the shapes depend on the bucket only
    (two masks with different token counts in one bucket give equal shapes); scattering drops the
    filler and gathering never reads out of range."""
    mask = holey_mask()  # 3 x 13, 24 real tokens
    batch, seq = mask.shape
    exact, layout = unpad_index(mask), unpad_index(mask, bucket)
    real = int(mask.sum())
    total = -(-real // bucket) * bucket
    assert layout.num_tokens == total and layout.bucket == bucket and layout.max_seqlen == seq
    assert layout.indices[:real].tolist() == exact.indices.tolist()
    assert layout.indices[real:].tolist() == [batch * seq] * (total - real)
    cu = layout.cu_seqlens.tolist()
    assert cu[:batch + 1] == exact.cu_seqlens.tolist() and cu[-1] == total
    assert len(cu) == batch + 1 + -(-bucket // seq)
    assert all(0 <= b - a <= seq for a, b in zip(cu[batch:-1], cu[batch + 1:], strict=True))
    x = torch.randn(batch, seq, 5)
    packed = unpad_rows(x, layout)
    assert packed.shape == (total, 5)
    torch.testing.assert_close(packed[:real], unpad_rows(x, exact), rtol=0, atol=0)
    torch.testing.assert_close(pad_rows(packed, layout), x * mask[..., None], rtol=0, atol=0)
    filled = scatter_rows(packed, layout, -7.0)
    torch.testing.assert_close(filled, torch.where(mask[..., None].bool(), x, -7.0), rtol=0, atol=0)
    positions = torch.tensor([[0, 4, 9], [0, 4, 6], [0, 2, 6]])
    torch.testing.assert_close(packed[packed_rows(layout, positions)], x[torch.arange(3)[:, None], positions],
                               rtol=0, atol=0)


def test_bucketed_shapes_change_only_between_buckets():
    """Every token count from 17 to 32 in a 4 x 10 batch gives the same shapes with bucket 16 (and
    the same max_seqlen); 33 gives the next bucket's."""
    shapes = set()
    for count in range(17, 34):
        mask = (torch.arange(40) < count).long().view(4, 10)
        layout = unpad_index(mask, 16)
        shapes.add((tuple(layout.indices.shape), tuple(layout.cu_seqlens.shape), layout.max_seqlen,
                    count == 33))
    assert shapes == {((32,), (7,), 10, False), ((48,), (7,), 10, True)}


def test_bucketed_index_of_an_empty_mask_is_one_bucket_of_filler():
    layout = unpad_index(torch.zeros(2, 4), 6)
    assert layout.indices.tolist() == [8] * 6 and layout.cu_seqlens.tolist() == [0, 0, 0, 4, 6]


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


@pytest.mark.parametrize("pre_layer_norm,bucket",
                         [(False, 0), (True, 0), (False, 16), (True, 7), (False, 40)])
def test_unpadded_loss_and_every_gradient_equal_padded(pre_layer_norm, bucket):
    """Exact or bucketed (filler rows up to a multiple of ``bucket``): the padded model's loss and
    gradients; the filler changes nothing."""
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
        layout = unpad_index(mask, bucket) if model is unpadded else None
        mlm, nsp = model(ids, types, mask, positions, unpadded=layout)
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


@pytest.mark.parametrize("bucket", [0, 16])
def test_a_static_compile_traces_once_per_bucket_not_once_per_token_count(bucket):
    """What bucketing is for: with static shapes (``dynamic=False``, as a CUDA graph needs) a
    compiled model traces again for every new shape. Batches of 20, 25, 30 and 40 real tokens are
    four shapes exactly, two with bucket 16 (32 and 48 rows); the outputs match the eager model."""
    torch._dynamo.reset()
    traces = []

    def count(gm, example_inputs):
        traces.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**SMALL), unpad=True).eval()
    compiled = torch.compile(model, backend=count, dynamic=False, fullgraph=True)
    for tokens in (20, 25, 30, 40):
        mask = (torch.arange(40) < tokens).long().view(4, 10)
        ids = torch.randint(5, 99, mask.shape) * mask
        layout = unpad_index(mask, bucket)
        with torch.no_grad():
            got = compiled(ids, None, mask, torch.tensor([[1]] * 4), unpadded=layout)
            want = model(ids, None, mask, torch.tensor([[1]] * 4), unpadded=unpad_index(mask))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert len(traces) == (2 if bucket else 4)


def test_the_model_makes_its_own_bucketed_layout():
    """``unpad_bucket`` belongs to the model: :meth:`BertModel.layout` (what the training loops copy
    to the device) and a forward without a precomputed layout both round up to it; the logits at
    real tokens are the padded model's."""
    _, padded, _ = models()
    bucketed = BertForPreTraining(BertConfig(**SMALL), unpad=True, unpad_bucket=16).eval()
    bucketed.load_state_dict(padded.state_dict())
    mask = holey_mask()
    layout = bucketed.bert.layout(mask)
    assert layout.bucket == 16 and layout.num_tokens == 32  # 24 real tokens
    assert padded.bert.layout(mask) is None
    ids = torch.randint(5, 99, mask.shape) * mask
    with torch.no_grad():
        want, want_nsp = padded(ids, None, mask)
        got, got_nsp = bucketed(ids, None, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_nsp, want_nsp, atol=1e-5, rtol=1e-5)
