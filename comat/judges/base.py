"""What a judge is: a frozen model that a benchmark asks about images or texts, loaded by reference (a hub id, a
local ``save_pretrained`` directory or a toy zoo name) and identified by the fingerprint of its weights."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from comat.models.fingerprint import model_fingerprint


class Judge(ABC):
    @classmethod
    @abstractmethod
    def load(cls, ref: str, *, device: str | torch.device = "cpu") -> "Judge":
        """The judge of reference ``ref`` on ``device``; a reference of the wrong kind gets one line naming it."""

    @classmethod
    def fingerprint(cls, ref: str) -> str:
        """sha256 of what decides the answers (the weights), so a retrained judge never reuses cached answers."""
        return model_fingerprint(ref)
