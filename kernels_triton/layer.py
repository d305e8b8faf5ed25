"""A BERT transformer layer built from the fused Triton ops, a drop-in for
``bertrecipes.model.bert.BertLayer``: the same submodules and parameter names and shapes (so any
checkpoint loads into either), the same ``forward(x [B,S,H], key_padding_mask bool [B,S] or None)``,
and the same unpadded form ``forward(x [T,H], Unpadded)`` (packed real tokens: attention runs the
varlen flash kernel over ``cu_seqlens`` directly, every other kernel is row-wise).

Per sub-block the big GEMMs stay torch ``F.linear`` calls and every bias that has a fused consumer
is applied there:

* attention: one ``F.linear`` with the concatenated q/k/v weights and biases -> flash attention on
  the packed [B, S, 3, heads, head_dim] view -> ``F.linear`` (no bias) -> bias + dropout + residual
  (+ LayerNorm);
* FFN: ``F.linear`` (no bias) -> bias + GELU -> ``@ W_out^T`` -> bias + dropout + residual
  (+ LayerNorm).

Post-LN: ``x = LN_a(x + drop(attn(x)))``; ``x = LN_o(x + drop(ffn(x)))``. Pre-LN: ``h = LN_a(x)``;
``x, h = x + drop(attn(h)), LN_o(...)`` in one kernel; ``x = x + drop(ffn(h))``.

The flags keep DeepSpeed's transformer-kernel names and change what is kept for the backward, never
the result: ``normalize_invertible`` (LayerNorms keep their output, not their input),
``gelu_checkpoint`` (the GELU output is recomputed, not kept), ``attn_dropout_checkpoint`` (the
attention output and log-sum-exp are recomputed, not kept), ``stochastic_mode`` (atomics for dQ and
the bias/LayerNorm parameter gradients: faster, not bitwise reproducible).

The config is duck-typed: any object with BertConfig's field names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels_triton.attention import flash_attention_qkvpacked, flash_attention_varlen_qkvpacked
from kernels_triton.bias_dropout_residual_layernorm import (
    bias_dropout_residual,
    bias_dropout_residual_layernorm,
    layer_norm,
)
from kernels_triton.bias_gelu import bias_gelu_linear


class _SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob


class _DenseNormDropout(nn.Module):
    """``dense`` + ``LayerNorm`` + ``dropout``: BertSelfOutput's and BertOutput's submodules."""

    def __init__(self, config, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class _Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _DenseNormDropout(config, config.hidden_size)


class _Intermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs will run in: autocast's when it is on, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class TritonBertLayer(nn.Module):
    """BertLayer on fused Triton kernels; see the module docstring."""

    def __init__(self, config, normalize_invertible: bool = False, gelu_checkpoint: bool = False,
                 attn_dropout_checkpoint: bool = False, stochastic_mode: bool = False):
        super().__init__()
        self.pre_layer_norm = bool(config.pre_layer_norm)
        self.normalize_invertible = normalize_invertible
        self.gelu_checkpoint = gelu_checkpoint
        self.attn_dropout_checkpoint = attn_dropout_checkpoint
        self.stochastic_mode = stochastic_mode
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _DenseNormDropout(config, config.intermediate_size)

    # Under torch.compile (compile=true) the fused ops are custom ops (torch.library) that the graph
    # calls as they are: the whole model is one graph, with the GEMMs, the embeddings, unpadding, the
    # heads and the loss compiled around the Triton kernels, and no Triton in Dynamo's tracing.
    def forward(self, x: torch.Tensor, layout, branch_scale: float = 1.0) -> torch.Tensor:
        """``branch_scale`` multiplies both residual branches before they join the residual stream
        (progressive layer dropping's 1 / keep probability), inside the bias + dropout + residual
        kernels."""
        hidden = x.shape[-1]
        rows = x.shape[:-1]  # (B, S) padded, (T,) packed
        attn, attn_out, ffn_out = self.attention.self, self.attention.output, self.output
        deterministic = not self.stochastic_mode
        p_attn = attn.dropout_p if self.training else 0.0
        p_attn_out = attn_out.dropout.p if self.training else 0.0
        p_ffn_out = ffn_out.dropout.p if self.training else 0.0
        ln_a, ln_o = attn_out.LayerNorm, ffn_out.LayerNorm
        w_a, b_a = attn_out.dense.weight, attn_out.dense.bias
        w_f, b_f = ffn_out.dense.weight, ffn_out.dense.bias
        norm = dict(invertible=self.normalize_invertible, deterministic=deterministic)
        scale = float(branch_scale)

        h = x
        if self.pre_layer_norm:
            h = layer_norm(x, ln_a.weight, ln_a.bias, ln_a.eps, out_dtype=_compute_dtype(x), **norm)
        w_qkv = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
        b_qkv = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])
        qkv = F.linear(h, w_qkv, b_qkv).view(*rows, 3, attn.num_heads, attn.head_dim)
        options = dict(deterministic=deterministic, recompute_output=self.attn_dropout_checkpoint)
        if x.dim() == 2:  # packed real tokens; layout is an Unpadded
            context = flash_attention_varlen_qkvpacked(qkv, layout.cu_seqlens, layout.max_seqlen, p_attn,
                                                       **options)
        else:  # layout is the key-padding mask or None
            context = flash_attention_qkvpacked(qkv, layout, p_attn, **options)
        a = F.linear(context.view(*rows, hidden), w_a)
        if self.pre_layer_norm:  # the sum continues the residual stream, LN_o(sum) feeds the FFN
            x, h = bias_dropout_residual_layernorm(a, b_a, x, ln_o.weight, ln_o.bias, ln_o.eps, p_attn_out,
                                                   return_sum=True, branch_scale=scale, **norm)
        else:
            x = h = bias_dropout_residual_layernorm(a, b_a, x, ln_a.weight, ln_a.bias,
                                                    ln_a.eps, p_attn_out, branch_scale=scale, **norm)

        pre_activation = F.linear(h, self.intermediate.dense.weight)
        f = bias_gelu_linear(pre_activation, self.intermediate.dense.bias, w_f,
                             checkpoint=self.gelu_checkpoint, deterministic=deterministic)
        if self.pre_layer_norm:
            return bias_dropout_residual(f, b_f, x, p_ffn_out, deterministic=deterministic,
                                         branch_scale=scale)
        return bias_dropout_residual_layernorm(f, b_f, x, ln_o.weight, ln_o.bias, ln_o.eps,
                                               p_ffn_out, branch_scale=scale, **norm)


# The DeepSpeed-named memory/speed options of TritonBertLayer (and of ``conf/kernel/triton.yaml``).
LAYER_FLAGS = ("normalize_invertible", "gelu_checkpoint", "attn_dropout_checkpoint", "stochastic_mode")


def make_layer_factory(normalize_invertible: bool = False, gelu_checkpoint: bool = False,
                       attn_dropout_checkpoint: bool = False,
                       stochastic_mode: bool = False) -> Callable[[object], TritonBertLayer]:
    """``layer_factory`` for ``BertForPreTraining``: builds a :class:`TritonBertLayer` per layer with
    these DeepSpeed-named flags (``conf/kernel/triton.yaml``)."""

    flags = dict(normalize_invertible=normalize_invertible, gelu_checkpoint=gelu_checkpoint,
                 attn_dropout_checkpoint=attn_dropout_checkpoint, stochastic_mode=stochastic_mode)

    def factory(config) -> TritonBertLayer:
        return TritonBertLayer(config, **flags)

    return factory
