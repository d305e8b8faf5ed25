"""The reference user's training step, shared by the benchmarks' ``hf`` rows: transformers' BERT
(sdpa attention) built to our config's shape, ``torch.optim.AdamW`` (fused on CUDA) and
``torch.amp.GradScaler`` (active for fp16 only), with the gradient clipped to norm 1.0."""

from __future__ import annotations

import torch

from bertrecipes.model import BertConfig


def hf_bert_config(config: BertConfig):
    """transformers.BertConfig of the same shape as ``config``, sdpa attention."""
    import transformers

    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
        attn_implementation="sdpa",
    )


class HFUserStep:
    """AdamW (fused on CUDA) + GradScaler: ``update(loss)`` runs the scaled backward of one
    micro-batch's loss (divided by ``accumulation``) and, every ``accumulation`` micro-batches,
    unscale, clip to 1.0, step, scale update and zero_grad, as a Hugging Face training loop does."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, lr: float,
                 weight_decay: float, accumulation: int = 1) -> None:
        self.model = model
        self.accumulation, self.micro_steps = accumulation, 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                           fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def update(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulation if self.accumulation > 1 else loss).backward()
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
