"""The method interface: what the trainer (``comat.train.trainer``) and the sampler need from an alignment method.

Three shapes of method, one small interface each:

* :class:`FineTuneMethod` trains parameters inside the trainer's loop. The trainer owns accelerate, gradient
  accumulation, AMP, clipping, checkpoints, logs and NaN checks; the method only says *what* trains
  (:meth:`~FineTuneMethod.updates`: parameter sets, each with its optimiser settings and loss) and how to write
  and apply the result (:meth:`~FineTuneMethod.save` / :meth:`~FineTuneMethod.load`).

  - CoMat (``comat.methods.comat.method``): a LoRA on the UNet, plus a second update for its discriminator.
  - SoftREPA (planned): soft text tokens as the trainable parameters, inserted by forward pre-hooks on the UNet's
    cross-attention inputs (``encoder_hidden_states`` gains n tokens in the chosen blocks), so sampling and
    attention capture need no UNet copy; ``training_loss`` is the B x B contrastive denoising loss; ``save``
    writes the tokens, ``load`` re-installs the hooks on a plain pipeline.

* :class:`InferenceMethod` changes sampling only: the sampler calls :meth:`~InferenceMethod.latent_update` before
  each UNet call and continues from the latents it returns. CONFORM and Attend-and-Excite (planned) optimise the
  latent there against a loss on cross-attention maps captured with ``comat.generation.attention.AttentionStore``.

Register a method by name in ``comat.methods.METHODS``.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from comat.generation.sampling import PromptEmbeds

Terms = dict[str, Tensor]


@dataclasses.dataclass
class Batch:
    """One micro-batch: the prompts and the random streams the method must draw everything from.

    The trainer derives both streams from (seed, rank, step, micro-batch), so a resumed run replays them exactly and
    every rank draws different noise and prompts.
    """

    prompts: list[str]
    step: int
    generator: torch.Generator  # torch draws: noise, grad-step phase, captioner jitter
    rng: np.random.Generator  # host-side draws: data, choices


@dataclasses.dataclass
class Update:
    """One optimiser over ``params`` driven by the sum of the terms ``loss(batch)`` returns.

    Per micro-batch the trainer runs every update's loss and backward in order, then, on a synchronising step,
    clips and steps all optimisers. A later update may use what an earlier one left behind (CoMat's discriminator
    scores the generator's detached fake latents). Terms named ``_*`` are logged but not added to the loss.
    """

    name: str
    params: list[nn.Parameter]
    loss: Callable[[Batch], Terms]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float | None = None


class FineTuneMethod(ABC):
    """A method that trains parameters attached to (or hooked into) ``pipe``."""

    name: str = ""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters of the method's product (what :meth:`save` writes)."""

    @abstractmethod
    def training_loss(self, batch: Batch) -> Terms:
        """The loss terms of the main update for one micro-batch (summed by the trainer)."""

    def updates(self) -> list[Update]:
        """All updates, main first; override to add auxiliary ones (a discriminator)."""
        return [Update("main", self.trainable_parameters(), self.training_loss, lr=1e-4)]

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules whose trainable tensors a checkpoint must hold to resume."""
        return {}

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the trained product in a form :meth:`load` (and, for a LoRA, plain diffusers) reads."""

    @classmethod
    @abstractmethod
    def load(cls, pipe, directory: str | os.PathLike) -> None:
        """Apply a saved product to a plain pipeline."""


class InferenceMethod(ABC):
    """A training-free method: a per-step latent update inside the sampling loop."""

    name: str = ""

    def setup(self, pipe, prompts: list[str]) -> None:
        """Prepare per-prompt state (token groups, attention capture) before sampling."""

    @abstractmethod
    def latent_update(self, i: int, t: Tensor, latents: Tensor, embeds: PromptEmbeds) -> Tensor:
        """Return the latents the sampler continues from at step ``i`` (timestep ``t``)."""
