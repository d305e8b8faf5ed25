"""Fused Triton kernels for the BERT transformer layer: flash attention (padded or varlen, with
in-kernel dropout), bias + GELU, bias + dropout + residual + LayerNorm, each with its backward and a
PyTorch reference, and :class:`TritonBertLayer`, a drop-in for ``BertLayer`` (``kernel=triton``).

Eager calls run through ``torch.autograd.Function``s; inside a ``torch.compile`` graph the same
launchers run as custom ops (``torch.ops.kernels_triton.*``: forward and backward of each op, with
fake implementations), so a model on :class:`TritonBertLayer` compiles as one graph. Dropout seeds
are drawn on the device and loaded by the kernels (``utils.dropout_seed``): no op reads a tensor on
the host, so CUDA graphs can capture them.

Depends on torch and triton only. On a machine without a GPU the kernels run in Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before this package is imported (slow; for tests).
"""

from kernels_triton.attention import (
    FlashAttentionFunction,
    FlashSelfAttention,
    attention_dropout_mask,
    attention_ref,
    flash_attention,
    flash_attention_qkvpacked,
    flash_attention_varlen,
    flash_attention_varlen_qkvpacked,
)
from kernels_triton.bias_dropout_residual_layernorm import (
    BiasDropoutResidualLayerNorm,
    BiasDropoutResidualLayerNormFunction,
    bias_dropout_residual,
    bias_dropout_residual_layernorm,
    bias_dropout_residual_layernorm_ref,
    bias_dropout_residual_ref,
    layer_norm,
    row_dropout_mask,
)
from kernels_triton.bias_gelu import (
    BiasGelu,
    BiasGeluFunction,
    BiasGeluLinearFunction,
    bias_gelu,
    bias_gelu_linear,
    bias_gelu_linear_ref,
    bias_gelu_ref,
)
from kernels_triton.layer import LAYER_FLAGS, TritonBertLayer, make_layer_factory
from kernels_triton.utils import INTERPRET

__all__ = [
    "INTERPRET",
    "TritonBertLayer",
    "make_layer_factory",
    "LAYER_FLAGS",
    "FlashAttentionFunction",
    "FlashSelfAttention",
    "attention_dropout_mask",
    "attention_ref",
    "flash_attention",
    "flash_attention_qkvpacked",
    "flash_attention_varlen",
    "flash_attention_varlen_qkvpacked",
    "BiasDropoutResidualLayerNorm",
    "BiasDropoutResidualLayerNormFunction",
    "bias_dropout_residual",
    "bias_dropout_residual_layernorm",
    "bias_dropout_residual_layernorm_ref",
    "bias_dropout_residual_ref",
    "layer_norm",
    "row_dropout_mask",
    "BiasGelu",
    "BiasGeluFunction",
    "BiasGeluLinearFunction",
    "bias_gelu",
    "bias_gelu_linear",
    "bias_gelu_linear_ref",
    "bias_gelu_ref",
]
