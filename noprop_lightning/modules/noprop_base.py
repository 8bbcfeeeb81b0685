"""The base of the NoProp modules: the shared parts live in a plain-torch objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from noprop_lightning.errors import ConfigurationError
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

    def to_torchscript(
        self,
        file_path: str | Path | None = None,
        method: str | None = "script",
        example_inputs: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Refuse ``method="script"`` clearly; ``"trace"`` is Lightning's (see :func:`scriptable`).

        Raises:
            ConfigurationError: For ``method="script"`` (the default).
        """
        scriptable(self, method)
        return super().to_torchscript(file_path, method, example_inputs, **kwargs)


def scriptable(module: L.LightningModule, method: str | None) -> None:
    """Raise a clear error for ``module.to_torchscript(method="script")``.

    ``torch.jit.script`` cannot compile these modules (their inference runs Python settings
    objects and helpers TorchScript does not support; TorchScript itself is deprecated in
    PyTorch), so Lightning's default would end in a long TorchScript traceback.
    ``method="trace"`` works (it traces ``forward`` in the module's current inference mode);
    :mod:`noprop_lightning.export` exports the deterministic inference chain with
    ``torch.export`` or to ONNX.

    Raises:
        ConfigurationError: Unless ``method`` is ``"trace"``.
    """
    if method == "trace":
        return
    name = type(module).__name__
    raise ConfigurationError(
        f"{name}.to_torchscript(method={method!r}) is not supported: TorchScript cannot "
        f"compile {name} (and is deprecated in PyTorch). Export the deterministic inference "
        "chain (images -> logits) with noprop_lightning.export: export_program(model) "
        "(torch.export) or export_onnx(model, 'model.onnx'); or trace forward with "
        "to_torchscript(method='trace', example_inputs=images)"
    )


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
