"""The NoProp-CT and NoProp-FM objectives in plain torch (no Lightning).

Both train *one* time-conditioned network ``u(z_t, x, t)``
(:class:`~noprop_lightning.nets.TimeConditionedBlock`, passed in) on independent draws of the
time ``t ~ U[0, 1]``, one per example. Time runs from noise (``z_0``) to label (``z_1``);
inference integrates an ODE from ``t = 0`` to ``t = 1``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from noprop_lightning.metric_names import CE, DENOISE, FLOW, KL, LOSS
from noprop_lightning.nets import LabelEmbedding
from noprop_lightning.schedules import FlowMatchingPath, LearnableSchedule, Sampler
from noprop_lightning.settings import (
    Settings,
    check_choice,
    check_int,
    check_number,
    check_optional_int,
)

InferenceStart = Literal["zero", "noise"]


@dataclasses.dataclass(frozen=True)
class CTSettings(Settings):
    """Hyper-parameters of the NoProp-CT objective and its learnable schedule.

    Attributes:
        eta: Weight of the denoising term (paper: 1), > 0.
        gamma_0: Initial ``gamma(0) = -log SNR(0)`` (default ``ln 1000``).
        gamma_1: Initial ``gamma(1) = -log SNR(1)`` (default ``-ln 100``), < ``gamma_0``.
        schedule_hidden: Sigmoid units of the monotone ``gamma`` network.
        learn_endpoints: Whether ``gamma_0`` and ``gamma_1`` are trained (paper: yes).
    """

    eta: float = 1.0
    gamma_0: float = math.log(1000.0)
    gamma_1: float = -math.log(100.0)
    schedule_hidden: int = 64
    learn_endpoints: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "eta", check_number("objective.eta", self.eta, above=0.0))
        gamma_1 = check_number("objective.gamma_1", self.gamma_1)
        object.__setattr__(self, "gamma_1", gamma_1)
        object.__setattr__(self, "gamma_0", check_number("objective.gamma_0", self.gamma_0))
        hidden = check_int("objective.schedule_hidden", self.schedule_hidden)
        object.__setattr__(self, "schedule_hidden", hidden)


@dataclasses.dataclass(frozen=True)
class FMSettings(Settings):
    """Hyper-parameters of the NoProp-FM objective.

    Attributes:
        sigma: Standard deviation of the noise around the straight path, >= 0 (the paper
            does not give its value).
    """

    sigma: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", check_number("objective.sigma", self.sigma, at_least=0.0))


@dataclasses.dataclass(frozen=True)
class SamplerSettings(Settings):
    """How NoProp-CT / NoProp-FM integrate from noise to label at inference.

    Runtime settings: they may change at ``validate`` / ``test`` / ``predict`` and on resume.

    Attributes:
        steps: Sampler steps for test and predict (paper: 1000).
        val_steps: Sampler steps during validation (cheaper model selection); ``None`` uses
            ``steps``.
        sampler: ``"euler"`` or ``"heun"``.
        start: ``"zero"`` (deterministic, ``z_0 = 0``, the prior's mean) or ``"noise"``
            (``z_0 ~ N(0, I)``).
    """

    steps: int = 1000
    val_steps: int | None = None
    sampler: Sampler = "euler"
    start: InferenceStart = "zero"

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_int("inference.steps", self.steps))
        object.__setattr__(
            self, "val_steps", check_optional_int("inference.val_steps", self.val_steps)
        )
        check_choice("inference.sampler", self.sampler, Sampler)
        check_choice("inference.start", self.start, InferenceStart)


class ContinuousObjective(nn.Module):
    """What CT and FM share: the embedding, the start state and the sampling entry point."""

    embedding: LabelEmbedding

    @property
    def embed_dim(self) -> int:
        """The label embedding dimension ``d``."""
        return self.embedding.dim

    def start_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        start: InferenceStart = "zero",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``z_0``: zeros (``start="zero"``) or ``N(0, I)`` draws (``"noise"``)."""
        shape = (batch_size, self.embed_dim)
        if start == "zero":
            return torch.zeros(shape, device=device)
        return torch.randn(shape, device=device, generator=generator)

    def losses(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms for a batch; ``"loss"`` is the total that is minimised."""
        raise NotImplementedError

    @staticmethod
    def draws(
        u: torch.Tensor, t: torch.Tensor | None, *normals: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """The random inputs of a loss, drawn where not given (in this order).

        Args:
            u: ``(B, d)`` clean label embeddings (gives the batch, shape and device).
            t: ``(B,)`` times, or ``None`` for ``U[0, 1]`` draws (one per example).
            *normals: ``(B, d)`` tensors, or ``None`` for standard normal draws.

        Returns:
            ``(t, *normals)`` with every ``None`` replaced.
        """
        t = torch.rand(u.shape[0], device=u.device) if t is None else t
        return t, *(torch.randn_like(u) if n is None else n for n in normals)

    def integrate(
        self, net: nn.Module, features: torch.Tensor, z0: torch.Tensor, steps: int, sampler: Sampler
    ) -> torch.Tensor:
        """Integrate from ``z0`` at ``t = 0`` to ``z_1`` given the encoded images ``features``."""
        raise NotImplementedError

    def classify(self, z1: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` from the final state ``z_1``."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self, net: nn.Module, x: torch.Tensor, z0: torch.Tensor, steps: int, sampler: Sampler
    ) -> torch.Tensor:
        """Integrate the label state from ``z0`` at ``t = 0`` to ``z_1`` for images ``x``.

        The image features are computed once and reused at every step.
        """
        return self.integrate(net, net.encode_image(x), z0, steps, sampler)


class CTObjective(ContinuousObjective):
    r"""NoProp-CT: continuous-time NoProp with a learnable noise schedule.

    One network predicts class logits; ``uhat(z_t, x, t) = softmax(logits) @ W_embed``. With
    the variance-preserving marginal of :class:`~noprop_lightning.schedules.LearnableSchedule`
    (``z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps``, ``SNR(t) = exp(-gamma(t))`` rising
    with ``t``), the loss for a batch is

    .. math::

        \mathrm{CE}(\mathrm{head}(z_1), y) + \mathrm{KL}(q(z_0|y) \,\|\, N(0, I))
        + \tfrac12 \eta\, \mathrm{SNR}'(t)\, \|\hat u(z_t, x, t) - u_y\|^2,

    with ``t ~ U[0, 1]`` and fresh noise per example, ``z_1 ~ q(z_1 | y)`` for the CE term and
    each term averaged over the batch. Inference integrates the probability-flow ODE and
    returns ``head(z_1)``.

    Args:
        embedding: The label embedding.
        num_classes: ``K``, the outputs of the linear classifier on ``z_1`` (built here).
        settings: ``eta`` and the schedule's initial endpoints and size.
    """

    def __init__(
        self, *, embedding: LabelEmbedding, num_classes: int, settings: CTSettings | None = None
    ) -> None:
        super().__init__()
        settings = CTSettings.coerce(settings)
        self.embedding = embedding
        self.schedule = LearnableSchedule(
            settings.gamma_0, settings.gamma_1, settings.schedule_hidden, settings.learn_endpoints
        )
        self.head = nn.Linear(embedding.dim, num_classes)
        self.eta = settings.eta

    def denoise(
        self, net: nn.Module, features: torch.Tensor, z: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """``uhat = softmax(net(z, x, t)) @ W_embed`` from precomputed image features."""
        logits = net.forward_features(features, z, t)
        return torch.softmax(logits, dim=-1) @ self.embedding.weight

    def losses(
        self,
        net: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        final_noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The CT loss terms for a batch.

        Args:
            net: The time-conditioned network.
            x: ``(B, C, H, W)`` images.
            y: ``(B,)`` labels.
            t: ``(B,)`` times (default ``U[0, 1]`` draws).
            noise: ``(B, d)`` noise making ``z_t`` (default standard normal).
            final_noise: ``(B, d)`` noise making ``z_1`` for the CE term (default standard
                normal).

        Returns:
            ``{"loss", "ce", "kl", "denoise"}``; ``loss = ce + kl + denoise``.
        """
        u = self.embedding(y)
        t, noise, final_noise = self.draws(u, t, noise, final_noise)
        z_t = self.schedule.add_noise(u, t, noise)
        uhat = self.denoise(net, net.encode_image(x), z_t, t)
        weight = self.schedule.loss_weight(t, self.eta)
        denoise = (weight * (uhat - u).pow(2).sum(-1)).mean()
        z_1 = self.schedule.add_noise(u, torch.ones((), device=u.device), final_noise)
        ce = F.cross_entropy(self.head(z_1), y)
        kl = self.schedule.kl_prior(u)
        return {LOSS: ce + kl + denoise, CE: ce, KL: kl, DENOISE: denoise}

    def integrate(
        self, net: nn.Module, features: torch.Tensor, z0: torch.Tensor, steps: int, sampler: Sampler
    ) -> torch.Tensor:
        """Integrate the probability-flow ODE from ``z_0`` at ``t = 0`` to ``z_1``."""
        return self.schedule.sample(
            lambda z, t: self.denoise(net, features, z, t), z0, steps, sampler
        )

    def classify(self, z1: torch.Tensor) -> torch.Tensor:
        """``head(z_1)``, the linear classifier trained by the CE term."""
        return self.head(z1)


class FMObjective(ContinuousObjective):
    r"""NoProp-FM: flow matching from noise to the label embedding.

    With ``z_1 = u_y``, ``z_0 ~ N(0, I)``, ``t ~ U[0, 1]`` per example and
    ``z_t = t z_1 + (1 - t) z_0 + sigma * eps``, the network outputs a velocity
    ``v(z_t, x, t)`` in embedding space and the loss is

    .. math::

        \|v(z_t, x, t) - (z_1 - z_0)\|^2
        \;[\,+\; \mathrm{CE}(-\|\hat z_1 - W_k\|^2_{k=1..K},\ y),\quad
        \hat z_1 = z_t + (1 - t)\, v\,],

    averaged over the batch; the bracketed CE anchor is added only when the embedding is
    trainable, where it keeps the class embeddings apart. Logits are negative squared
    distances to the class embeddings, so the prediction is the class whose embedding is
    nearest to the integrated ``z_1``.

    Args:
        embedding: The label embedding.
        settings: The noise ``sigma`` around the straight path.
    """

    def __init__(self, *, embedding: LabelEmbedding, settings: FMSettings | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.path = FlowMatchingPath(FMSettings.coerce(settings).sigma)

    def losses(
        self,
        net: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        z0: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The FM loss terms for a batch.

        Args:
            net: The time-conditioned network.
            x: ``(B, C, H, W)`` images.
            y: ``(B,)`` labels.
            t: ``(B,)`` times (default ``U[0, 1]`` draws).
            z0: ``(B, d)`` path starting points (default standard normal).
            noise: ``(B, d)`` noise around the path (default standard normal).

        Returns:
            ``{"loss", "flow"}`` plus ``"ce"`` when the embedding is trainable.
        """
        u = self.embedding(y)
        t, z0, noise = self.draws(u, t, z0, noise)
        t_col = t.reshape(-1, 1)
        z_t, target = self.path.add_noise(u, z0, t_col, noise)
        v = net(x, z_t, t)
        flow = (v - target).pow(2).sum(-1).mean()
        terms = {LOSS: flow, FLOW: flow}
        if self.embedding.trainable:
            ce = F.cross_entropy(self.classify(z_t + (1 - t_col) * v), y)
            terms[CE] = ce
            terms[LOSS] = flow + ce
        return terms

    def integrate(
        self, net: nn.Module, features: torch.Tensor, z0: torch.Tensor, steps: int, sampler: Sampler
    ) -> torch.Tensor:
        """Integrate ``dz/dt = v(z, x, t)`` from ``z_0`` at ``t = 0`` to ``z_1``."""
        return self.path.sample(
            lambda z, t: net.forward_features(features, z, t), z0, steps, sampler
        )

    def classify(self, z1: torch.Tensor) -> torch.Tensor:
        """Logits ``-||z_1 - W_k||^2``: the argmax is the nearest class embedding."""
        weight = self.embedding.weight
        # Expanded square (no (B, K, d) intermediate; cdist's gradient is NaN at distance 0).
        return 2 * z1 @ weight.T - z1.pow(2).sum(-1, keepdim=True) - weight.pow(2).sum(-1)
