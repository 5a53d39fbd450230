"""Worlds beside the real one, by name (``toy``): where the trainer and the methods get prompt sets and
image-caption pairs when a config names a world instead of a file.

Worlds are found through the ``comat.worlds`` entry-point group, so the layers below a world (methods, trainer)
name it without importing it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from comat.core.registry import Registry


class World(Protocol):
    categories: tuple[str, ...]  # every prompt category of the world
    default_categories: tuple[str, ...]  # the ones a prompt set holds when none are named

    def prompts(self, category: str, split: str) -> list[str]:
        """The prompts of one category in a split: ``train`` or ``open`` (every attribute-object pair, minus the
        evaluation prompts)."""

    def caption_pairs(self, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
        """``n`` (image, caption) pairs: uint8 images ``[n, H, W, 3]`` and their captions."""


WORLDS: Registry[World] = Registry("world", group="comat.worlds")
