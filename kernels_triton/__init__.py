"""Fused Triton kernels for the BERT transformer layer (attention, bias+GELU,
bias+dropout+residual+LayerNorm). Not built yet: `kernel=torch` is the only
kernel choice until this package provides its layer."""
