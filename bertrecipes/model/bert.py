"""BERT for pre-training (MLM + NSP) and its building blocks, in plain PyTorch.

Parameter names follow Hugging Face's ``BertForPreTraining`` (``bert.embeddings.*``,
``bert.encoder.layer.N.attention.self.query.weight``, ``cls.predictions.*``,
``cls.seq_relationship.*``), so one state dict layout serves every kernel and every
checkpoint converter.

Two layer orders are supported:

* post-LN (original BERT): ``x = LN_a(x + attn(x))``; ``x = LN_o(x + ffn(x))``;
* pre-LN (``pre_layer_norm=True``, DeepSpeed's large-batch variant):
  ``x = x + attn(LN_a(x))``; ``x = x + ffn(LN_o(x))``; and a final LayerNorm
  (``bert.encoder.FinalLayerNorm``) after the last layer.

``LN_a`` is ``attention.output.LayerNorm`` and ``LN_o`` is ``output.LayerNorm`` in both orders:
each LayerNorm belongs to its sub-block, wherever the order puts it.

The MLM head runs only at the masked positions (gathered before the vocabulary projection),
which is where most of the head's FLOPs would otherwise go.

Unpadding (``unpad=True``, ``kernel.unpad`` in the configs): the real tokens of a padded [B, S]
batch are packed into one [T, H] matrix after the embedding lookup and every layer runs on the T
rows only, so projections, GELU, LayerNorms and dropout never touch padding. Attention needs to
know which rows form a sequence: the Triton layer reads the packed rows directly (varlen flash
attention over ``cu_seqlens``); the PyTorch layer scatters q, k, v back to [B, S] for
``scaled_dot_product_attention`` and gathers the context again. Results at real tokens equal the
padded model's (the attention mask already kept padding out of them). :func:`unpad_index` finds
the real tokens; compute it on the CPU copy of the mask (as the training loops do) and no host
sync is needed on the GPU. ``unpad_index(mask, bucket=N)`` rounds the packed row count up to a
multiple of N with filler rows (sequences of their own that no output reads), so the encoder sees
a few fixed shapes instead of a new one every batch: what CUDA graphs need.

Quick check::

    python -c "from bertrecipes.model import BertConfig, BertForPreTraining; \
print(BertForPreTraining(BertConfig(vocab_size=100)))"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BertConfig:
    """Architecture hyper-parameters, with the names of Google's ``bert_config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pre_layer_norm: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (exact erf GELU), got {self.hidden_act!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Unpadded:
    """Where the real tokens of a padded [B, S] batch are, for running the encoder on them alone.

    ``indices`` int64 [T]: flat positions ``b * S + s`` of the real tokens, in order;
    ``cu_seqlens`` int32 [B + 1]: sequence b is packed rows ``cu_seqlens[b]:cu_seqlens[b + 1]``;
    ``max_seqlen``: an upper bound of the sequence lengths (a Python int: kernel launch sizes);
    ``mask`` bool [B, S]: True at real tokens (for layers that attend on the padded layout);
    ``bucket``: 0, or the multiple the packed row count was rounded up to. The rows past the real
    tokens are then filler: their ``indices`` entry is ``B * S`` (a slot past the end, which
    :func:`scatter_rows` drops), they form sequences of their own after the B real ones in
    ``cu_seqlens`` (each at most S long; some may be empty), and ``max_seqlen`` is S, so the shapes
    depend on the bucket alone.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    mask: torch.Tensor
    bucket: int = 0

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.mask.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def gather_indices(self) -> torch.Tensor:
        """``indices`` with the filler rows' past-the-end slot replaced by the last real one: where
        each packed row reads its input (a filler row's value is never used)."""
        if not self.bucket:
            return self.indices
        return self.indices.clamp(max=self.batch * self.seq_len - 1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Unpadded:
        return replace(self, indices=self.indices.to(device, non_blocking=non_blocking),
                       cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
                       mask=self.mask.to(device, non_blocking=non_blocking))


# What a layer's forward takes besides the hidden states: a key-padding mask bool [B, S] (True =
# real token) or None for the padded layout [B, S, H]; an Unpadded for the packed layout [T, H].
AttentionLayout = torch.Tensor | Unpadded | None


def unpad_index(attention_mask: torch.Tensor, bucket: int = 0) -> Unpadded:
    """The :class:`Unpadded` of a mask [B, S] (nonzero = real token). On a CUDA mask this waits for
    the GPU (the token count decides a shape); on the CPU copy it costs microseconds.

    ``bucket`` > 0 rounds the packed row count up to a multiple of ``bucket`` (at least one bucket)
    with filler rows, as :class:`Unpadded` describes: the encoder's shapes then change only when
    the token count crosses into another bucket, which is what CUDA graph replay needs."""
    mask = attention_mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(mask.shape)}")
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 0:
        raise ValueError(f"bucket must be a non-negative int (0 = no rounding), got {bucket!r}")
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    if bucket:
        return _round_up(Unpadded(indices, cu_seqlens, mask.shape[1], mask, bucket))
    max_seqlen = int(seqlens.max()) if mask.device.type == "cpu" and mask.numel() else mask.shape[1]
    return Unpadded(indices, cu_seqlens, max(max_seqlen, 1), mask)


def _round_up(layout: Unpadded) -> Unpadded:
    """Append the filler rows and sequences of a bucketed layout (see :class:`Unpadded`)."""
    real, bucket, seq_len = layout.indices.numel(), layout.bucket, layout.seq_len
    extra = max(1, -(-real // bucket)) * bucket - real
    # enough filler sequences (each at most seq_len rows) for any extra count (at most a bucket), so
    # the length of cu_seqlens is fixed too
    n_filler = -(-bucket // seq_len)
    lengths = (extra - torch.arange(n_filler, device=layout.indices.device) * seq_len).clamp(0, seq_len)
    ends = real + torch.cumsum(lengths, 0).to(torch.int32)
    trash = layout.indices.new_full((extra,), layout.batch * seq_len)
    return replace(layout, indices=torch.cat([layout.indices, trash]),
                   cu_seqlens=torch.cat([layout.cu_seqlens, ends]))


def unpad_rows(x: torch.Tensor, layout: Unpadded) -> torch.Tensor:
    """[B, S, ...] -> the packed rows [T, ...] (filler rows read the last slot)."""
    return x.flatten(0, 1).index_select(0, layout.gather_indices)


def scatter_rows(x: torch.Tensor, layout: Unpadded, fill: float = 0.0) -> torch.Tensor:
    """Packed rows [T, ...] -> [B, S, ...], ``fill`` at padding (filler rows are dropped)."""
    slots = layout.batch * layout.seq_len
    out = x.new_full((slots + (1 if layout.bucket else 0), *x.shape[1:]), fill)
    out = out.index_copy(0, layout.indices, x)
    return out[:slots].view(layout.batch, layout.seq_len, *x.shape[1:])


def pad_rows(x: torch.Tensor, layout: Unpadded) -> torch.Tensor:
    """[T, ...] -> [B, S, ...] with zeros at padding."""
    return scatter_rows(x, layout)


def packed_rows(layout: Unpadded, positions: torch.Tensor) -> torch.Tensor:
    """Packed row index [B, P] of positions [B, P] (a position at padding maps to row 0)."""
    slots = layout.batch * layout.seq_len + (1 if layout.bucket else 0)
    row_of = torch.zeros(slots, dtype=torch.long, device=layout.indices.device)
    row_of.index_copy_(0, layout.indices, torch.arange(layout.num_tokens, device=row_of.device))
    base = torch.arange(layout.batch, device=positions.device)[:, None] * layout.seq_len
    return row_of[base + positions.long()]


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] ids -> [B, S, H]; or packed [T] ids with their ``position_ids`` [T] -> [T, H]."""
        if position_ids is None:
            seq_len = input_ids.shape[-1]
            if seq_len > self.position_embeddings.num_embeddings:
                raise ValueError(
                    f"sequence length {seq_len} exceeds max_position_embeddings "
                    f"{self.position_embeddings.num_embeddings}"
                )
            position_ids = torch.arange(seq_len, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        unpadded = isinstance(layout, Unpadded)
        if unpadded:  # attend on the padded layout; the projections above ran on real rows only
            q, k, v = (pad_rows(t, layout) for t in (q, k, v))
        batch, seq_len, hidden = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        # the key-padding mask: bool [B, S], True where a key is a real token.
        key_padding_mask = layout.mask if unpadded else layout
        attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        context = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), attn_mask=attn_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        context = context.transpose(1, 2).reshape(batch, seq_len, hidden)
        return unpad_rows(context, layout) if unpadded else context


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as Google's BERT


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class BertLayer(nn.Module):
    """One transformer layer; ``pre_layer_norm`` picks the LayerNorm placement. ``forward(x, layout)``
    takes x [B, S, H] with a key-padding mask (or None), or packed x [T, H] with an Unpadded."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.pre_layer_norm = config.pre_layer_norm
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, layout: AttentionLayout, branch_scale: float = 1.0) -> torch.Tensor:
        """``branch_scale``: both residual branches (attention, FFN) are multiplied by it before they
        join the residual stream (progressive layer dropping's 1 / keep probability)."""
        attn_out, ffn_out = self.attention.output, self.output

        def branch(y: torch.Tensor) -> torch.Tensor:
            return y if branch_scale == 1.0 else y * branch_scale

        if self.pre_layer_norm:
            h = self.attention.self(attn_out.LayerNorm(x), layout)
            x = x + branch(attn_out.dropout(attn_out.dense(h)))
            h = self.intermediate(ffn_out.LayerNorm(x))
            return x + branch(ffn_out.dropout(ffn_out.dense(h)))
        h = self.attention.self(x, layout)
        x = attn_out.LayerNorm(x + branch(attn_out.dropout(attn_out.dense(h))))
        h = self.intermediate(x)
        return ffn_out.LayerNorm(x + branch(ffn_out.dropout(ffn_out.dense(h))))


LayerFactory = Callable[[BertConfig], nn.Module]


class BertEncoder(nn.Module):
    """The stack of layers. ``layer_factory`` builds each layer (default: :class:`BertLayer`); another
    implementation (a fused kernel) must keep BertLayer's parameter names and its forward signature
    ``(hidden_states [B,S,H], key_padding_mask bool [B,S] or None) -> hidden_states``, and, for
    unpadded runs, ``(hidden_states [T,H], Unpadded) -> hidden_states [T,H]``, and take the keyword
    ``branch_scale`` (see :meth:`BertLayer.forward`).

    ``layer_keep`` (progressive layer dropping, :mod:`bertrecipes.layer_drop`): one number per layer,
    0 to skip the layer (its input passes through), else the layer's keep probability p, by whose
    inverse its branches are scaled so that each layer's expected output is its full output. In
    training mode only: in eval mode every layer runs, unscaled, as DeepSpeed's engine passes the
    draw to training forwards only."""

    def __init__(self, config: BertConfig, layer_factory: LayerFactory | None = None):
        super().__init__()
        make_layer = layer_factory or BertLayer
        self.layer = nn.ModuleList(make_layer(config) for _ in range(config.num_hidden_layers))
        if config.pre_layer_norm:
            self.FinalLayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, layout: AttentionLayout,
                layer_keep: Sequence[float] | None = None) -> torch.Tensor:
        if layer_keep is not None:
            if len(layer_keep) != len(self.layer) or not all(0.0 <= k <= 1.0 for k in layer_keep):
                raise ValueError(f"layer_keep must hold one number in [0, 1] for each of the "
                                 f"{len(self.layer)} layers, got {tuple(layer_keep)}")
            if not self.training:
                layer_keep = None
        for i, layer in enumerate(self.layer):
            keep = 1.0 if layer_keep is None else float(layer_keep[i])
            if keep == 1.0:
                x = layer(x, layout)
            elif keep > 0.0:
                x = layer(x, layout, branch_scale=1.0 / keep)
        final_norm = getattr(self, "FinalLayerNorm", None)
        return final_norm(x) if final_norm is not None else x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(sequence_output[:, 0]))


class BertModel(nn.Module):
    """Embeddings + encoder + pooler; returns (sequence_output [B,S,H], pooled_output [B,H]).

    ``unpad=True`` runs the encoder on the real tokens only (see the module docstring); the
    returned sequence output is then zero at padding; ``unpad_bucket``: :func:`unpad_index`'s
    rounding of the packed rows. ``unpadded`` passes a precomputed layout of ``attention_mask``
    (:meth:`layout` makes the one this model would).
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True,
                 layer_factory: LayerFactory | None = None, unpad: bool = False, unpad_bucket: int = 0):
        super().__init__()
        self.config = config
        self.unpad = unpad
        self.unpad_bucket = unpad_bucket
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, layer_factory)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def layout(self, attention_mask: torch.Tensor) -> Unpadded | None:
        """The :class:`Unpadded` this model runs ``attention_mask`` [B, S] with, or None when it
        does not unpad. Make it from the CPU copy of the mask: on a CUDA mask it waits for the GPU."""
        return unpad_index(attention_mask, self.unpad_bucket) if self.unpad else None

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        unpadded: Unpadded | None = None,
        layer_keep: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, Unpadded | None]:
        """The encoder output: [B, S, H] and None, or, when unpadding, packed [T, H] and its
        Unpadded (padding rows never computed). ``layer_keep``: see :class:`BertEncoder`."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if unpadded is None and attention_mask is not None:
            unpadded = self.layout(attention_mask)
        if unpadded is None:
            key_padding_mask = None if attention_mask is None else attention_mask.bool()
            x = self.embeddings(input_ids, token_type_ids)
            return self.encoder(x, key_padding_mask, layer_keep), None
        seq_len = input_ids.shape[1]
        if seq_len > self.embeddings.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.embeddings.position_embeddings.num_embeddings}")
        idx = unpadded.gather_indices
        x = self.embeddings(input_ids.flatten().index_select(0, idx),
                            token_type_ids.flatten().index_select(0, idx), idx % seq_len)
        return self.encoder(x, unpadded, layer_keep), unpadded

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        unpadded: Unpadded | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, layout = self.encode(input_ids, token_type_ids, attention_mask, unpadded)
        if layout is not None:
            x = pad_rows(x, layout)
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """MLM head; ``decoder.weight`` is tied to the word embeddings by the owning model."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(x), self.decoder.weight, self.bias)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


def init_bert_weights(model: nn.Module, std: float) -> None:
    """Google BERT's initialisation: N(0, std) weights, zero biases, unit LayerNorms."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def gather_positions(sequence_output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``sequence_output`` [B,S,H] at ``positions`` [B,P] -> [B,P,H]."""
    index = positions.long().unsqueeze(-1).expand(-1, -1, sequence_output.shape[-1])
    return torch.gather(sequence_output, 1, index)


class BertForPreTraining(nn.Module):
    """BERT with the MLM and NSP heads.

    ``forward`` returns ``(mlm_logits, nsp_logits)``. With ``masked_lm_positions`` [B,P] the MLM
    logits are [B,P,V], computed only at those positions; without, [B,S,V] at every position
    (what Hugging Face's ``prediction_logits`` holds). ``layer_keep``: progressive layer dropping's
    draw for this forward (see :class:`BertEncoder`); None runs every layer.
    """

    def __init__(self, config: BertConfig, layer_factory: LayerFactory | None = None,
                 unpad: bool = False, unpad_bucket: int = 0):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, layer_factory=layer_factory, unpad=unpad, unpad_bucket=unpad_bucket)
        self.cls = BertPreTrainingHeads(config)
        self.tie_weights()
        init_bert_weights(self, config.initializer_range)

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        masked_lm_positions: torch.Tensor | None = None,
        unpadded: Unpadded | None = None,
        layer_keep: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, layout = self.bert.encode(input_ids, token_type_ids, attention_mask, unpadded, layer_keep)
        if layout is None:
            pooled = self.bert.pooler(x)
            if masked_lm_positions is not None:
                x = gather_positions(x, masked_lm_positions)
        else:  # packed rows: take the heads' inputs straight from them (position 0 for the pooler)
            positions = torch.zeros(layout.batch, 1, dtype=torch.long, device=x.device)
            if masked_lm_positions is not None:
                positions = torch.cat([positions, masked_lm_positions.long()], 1)
            rows = packed_rows(layout, positions)
            pooled = self.bert.pooler.dense(x[rows[:, 0]]).tanh()
            x = pad_rows(x, layout) if masked_lm_positions is None else x[rows[:, 1:]]
        mlm_logits = self.cls.predictions(x)
        nsp_logits = self.cls.seq_relationship(pooled)
        return mlm_logits, nsp_logits


def pretraining_loss(
    mlm_logits: torch.Tensor,
    nsp_logits: torch.Tensor,
    masked_lm_labels: torch.Tensor,
    next_sentence_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, mlm, nsp) losses. Labels of -100 (padding predictions) are ignored.

    The losses are computed in fp32 whatever the logits' dtype, so fp16/bf16 runs report the
    same quantity as fp32 runs.
    """
    mlm = F.cross_entropy(mlm_logits.float().flatten(0, -2), masked_lm_labels.flatten(), ignore_index=-100)
    nsp = F.cross_entropy(nsp_logits.float(), next_sentence_labels.view(-1))
    return mlm + nsp, mlm, nsp


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_sample(config: BertConfig, seq_len: int, num_predictions: int,
                              layers: float | None = None) -> float:
    """Model FLOPs of one training sample (forward + backward = 3 x forward), counting matmuls only.

    Per layer and token, the forward pass does 2*(4*H^2 + 2*H*I) for the QKV/output/FFN
    projections and 2*2*S*H for the attention scores and context; the MLM head does
    2*(H^2 + H*V) per predicted token, the pooler and NSP head 2*(H^2 + 2*H) per sample.
    ``layers``: the layers that ran (a mean, with progressive layer dropping); default all.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 4 * seq_len * h
    layers = config.num_hidden_layers if layers is None else layers
    encoder = layers * seq_len * per_token_layer
    heads = num_predictions * 2 * (h * h + h * v) + 2 * (h * h + 2 * h)
    return 3.0 * (encoder + heads)


__all__ = [
    "BertConfig",
    "BertModel",
    "BertForPreTraining",
    "BertLayer",
    "LayerFactory",
    "AttentionLayout",
    "Unpadded",
    "unpad_index",
    "pad_rows",
    "scatter_rows",
    "unpad_rows",
    "packed_rows",
    "gather_positions",
    "init_bert_weights",
    "pretraining_loss",
    "count_parameters",
    "training_flops_per_sample",
]
