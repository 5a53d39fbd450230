"""A DINOv2 where none can be had: the ``dino-image`` discriminator's feature network on toy models and in tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_dinov2(image_size: int) -> nn.Module:
    """A random small DINOv2 (fixed seed): the toy world's and the tests' stand-in feature network."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                        image_size=image_size, patch_size=8))
