"""The toy world as the trainer and the methods see it, declared as the ``toy`` entry of ``comat.worlds``."""

from __future__ import annotations

import numpy as np

from comat.toy.prompts import CATEGORIES, prompts
from comat.toy.world import caption_pairs


class ToyWorld:
    categories = CATEGORIES
    default_categories = ("color", "shape", "texture", "spatial", "non_spatial", "complex")  # T2I-CompBench's six

    def prompts(self, category: str, split: str) -> list[str]:
        return prompts(category, split)

    def caption_pairs(self, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
        return caption_pairs(n, seed)


WORLD = ToyWorld()
