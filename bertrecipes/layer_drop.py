"""Progressive layer dropping (PLD), DeepSpeed's ``progressive_layer_drop`` for BERT pre-training
(Zhang and He, "Accelerating Training of Transformer-Based Language Models with Progressive Layer
Dropping", 2020).

Each micro-batch runs a random subset of the encoder's layers; the subset shrinks as training goes:

* the global keep ratio is ``theta(t) = (1 - theta) * exp(-gamma * t) + theta``, 1 at ``t = 0`` and
  falling towards ``theta`` (DeepSpeed's ``theta`` and ``gamma``). As in DeepSpeed's engine, which
  updates it after each step from the step count before that step, the step taken after ``n``
  optimizer steps uses ``theta(max(n - 1, 0))``; ``n`` counts from the start of training, so a
  phase started with ``init_from`` a bertrecipes/DeepSpeed/NVIDIA checkpoint continues from that
  checkpoint's step (DeepSpeed restores its global step with the checkpoint);
* layer ``i`` of ``L`` (from 0, the one nearest the embeddings) runs with probability
  ``p_i = 1 - i / L * (1 - theta(t))``: the first layer always, the last with about ``theta(t)``;
* a layer that runs has both its residual branches (attention and FFN outputs, after dropout)
  multiplied by ``1 / p_i`` before they join the residual stream, so that each layer's expected
  output is its full output; a skipped layer passes its input through.

Once ``theta(t)`` has settled near ``theta``, a micro-batch does about ``1 - (1 - theta) * (L - 1) / (2 L)``
of the encoder's layer work: 0.76 for ``theta = 0.5`` and 24 layers.

A layer skipped in every micro-batch of a step gets a zero gradient, not none: the optimizer steps
it as DeepSpeed's does (its moments decay, weight decay and the trust ratio apply), and every
parameter's step count stays the same.

Each micro-batch's draw comes from a generator seeded with (seed, step, global micro-batch index)
alone, the index being the one the micro-batch's samples have in the global batch
(``micro_step * world_size + rank``): a run on N ranks draws for its micro-batches what one process
with N times the accumulation draws for the same samples, so its losses are that process's, and a
resumed run draws what the uninterrupted one did. Ranks run different layers in the same
micro-batch; DDP averages each gradient over all of them, a rank that skipped the layer adding
zeros (``find_unused_parameters``), and FSDP, which gathers a layer's weights with every rank, is
refused. Evaluation and fine-tuning run every layer, unscaled.

bing_bert's ``modelingpreln_layerdrop.py`` draws layer i with ``p_i`` but scales it by
``1 / p_{i+1}``; here the scale is the layer's own ``1 / p_i``, as the paper's expectation argument
asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bertrecipes.errors import ConfigError


@dataclass
class ProgressiveLayerDropConfig:
    """DeepSpeed's ``progressive_layer_drop`` block: ``enabled``, ``theta``, ``gamma``."""

    enabled: bool = False
    theta: float = 0.5  # the keep ratio theta(t) falls towards; lower = faster, less exact
    gamma: float = 0.001  # how fast it falls, per optimizer step


def pld_theta(step: int, theta: float, gamma: float) -> float:
    """The global keep ratio after ``step`` optimizer steps."""
    return (1.0 - theta) * math.exp(-gamma * step) + theta


def keep_probabilities(num_layers: int, theta_t: float) -> list[float]:
    """``p_i = 1 - i / L * (1 - theta_t)`` for each layer i of L."""
    return [1.0 - i / num_layers * (1.0 - theta_t) for i in range(num_layers)]


def expected_layers(num_layers: int, theta_t: float) -> float:
    """The mean number of layers a micro-batch runs at keep ratio ``theta_t``."""
    return sum(keep_probabilities(num_layers, theta_t))


class ProgressiveLayerDrop:
    """Draws each micro-batch's layers: ``draw(step, micro)`` is the ``layer_keep`` tuple
    :class:`bertrecipes.model.BertForPreTraining` takes (0 = skip, else the keep probability)."""

    _STREAM = 0x504C44  # keeps these draws apart from any other use of the run's seed

    def __init__(self, num_layers: int, theta: float, gamma: float, seed: int) -> None:
        check_config(theta, gamma)
        self.num_layers, self.theta, self.gamma, self.seed = num_layers, theta, gamma, seed

    def theta_at(self, steps_done: int) -> float:
        """The keep ratio of the step taken after ``steps_done`` optimizer steps: theta(n - 1), as
        DeepSpeed's engine applies it."""
        return pld_theta(max(steps_done - 1, 0), self.theta, self.gamma)

    def draw(self, steps_done: int, micro: int) -> tuple[float, ...]:
        """The layers of global micro-batch ``micro`` of the step taken after ``steps_done`` steps."""
        probabilities = keep_probabilities(self.num_layers, self.theta_at(steps_done))
        key = [self.seed % 2**64, self._STREAM, steps_done, micro]  # numpy takes non-negative words
        uniform = np.random.default_rng(key).random(self.num_layers)
        return tuple(p if u < p else 0.0 for p, u in zip(probabilities, uniform, strict=True))


def check_config(theta: float, gamma: float) -> None:
    if not 0.0 < theta <= 1.0:
        raise ConfigError(f"progressive_layer_drop.theta must be in (0, 1], got {theta}")
    if not (gamma >= 0.0 and math.isfinite(gamma)):
        raise ConfigError(f"progressive_layer_drop.gamma must be a finite number >= 0, got {gamma}")


__all__ = ["ProgressiveLayerDropConfig", "ProgressiveLayerDrop", "pld_theta", "keep_probabilities",
           "expected_layers", "check_config"]
