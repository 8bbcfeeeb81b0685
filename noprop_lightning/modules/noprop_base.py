"""The base of the NoProp modules: the shared parts live in a plain-torch objective."""

from __future__ import annotations

from torch import nn

from noprop_lightning.modules.base import ClassifierModule
from noprop_lightning.modules.guards import init_prototypes_from_data
from noprop_lightning.nets import ClassifierHead, LabelEmbedding


class NoPropBase(ClassifierModule):
    """A module whose shared parts (label embedding, head, schedule) live in :attr:`objective`.

    The objective is one of :mod:`noprop_lightning.objectives`; the networks it trains are
    the module's own (``blocks`` or ``net``).
    """

    objective: nn.Module

    @property
    def embedding(self) -> LabelEmbedding:
        """The label embedding ``W_embed`` (owned by :attr:`objective`)."""
        return self.objective.embedding

    @property
    def embed_dim(self) -> int:
        """The label embedding dimension ``d``."""
        return self.objective.embedding.dim

    def setup(self, stage: str) -> None:
        """Initialise prototype embeddings (and the head that reads them) from training images."""
        head = getattr(self.objective, "head", None)
        reader = head if isinstance(head, ClassifierHead) else None
        init_prototypes_from_data(self._trainer, self.embedding, reader)


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """Parameters that require gradients, from several modules, without duplicates."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
