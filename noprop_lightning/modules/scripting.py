"""Lightning's ``to_torchscript`` refused clearly (TorchScript cannot compile the modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from noprop_lightning.errors import ConfigurationError


class ScriptRefusal:
    """Mixin of a LightningModule: ``to_torchscript(method="script")`` is one clear error."""

    def to_torchscript(
        self,
        file_path: str | Path | None = None,
        method: str | None = "script",
        example_inputs: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Refuse ``method="script"`` clearly; ``"trace"`` is Lightning's (:func:`scriptable`).

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
