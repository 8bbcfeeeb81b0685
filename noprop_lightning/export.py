"""Export a trained model's deterministic inference: ``torch.export`` and ONNX.

The exported function maps images ``(B, C, H, W)`` to logits ``(B, K)`` and never sees a
label. It is the whole inference chain of the module, weights included:

- :class:`~noprop_lightning.modules.NoPropModule` (NoProp-DT): ``z_0 = 0``, the ``T`` blocks
  with ``eps = 0``, then the classifier head on ``z_T``; the same numbers as
  ``module.predict_logits(x, deterministic=True)``, whatever ``module.inference`` says.
- :class:`~noprop_lightning.modules.NoPropCTModule` and
  :class:`~noprop_lightning.modules.NoPropFMModule`: ``z_0 = 0``, the ODE sampler with a fixed
  number of steps (default ``inference.steps``) unrolled into the graph, then the head (CT)
  or the distances to the class embeddings (FM); the same numbers as
  ``module.predict_logits(x, steps, sampler, z0=zeros)``. Each step is one more network
  evaluation in the graph: 1000 steps export (slowly) a graph 1000 networks long.
- :class:`~noprop_lightning.modules.BackpropModule`: ``module.predict_logits(x)``.

The stochastic chain (NoProp-DT's ``inference="stochastic"``, CT/FM's ``start="noise"``)
draws fresh noise at every call and is not a function of its inputs; it is refused
(``deterministic=False``), and a module set to it exports its deterministic chain.

The module runs in eval mode while it is captured (BatchNorm's running statistics, no
dropout), on its own device and dtype; the batch dimension stays dynamic. ONNX needs the
optional packages ``onnx`` and ``onnxscript`` (``pip install "noprop-lightning[export]"``,
which also installs ``onnxruntime`` to run the file).

Example::

    from noprop_lightning.export import export_onnx, export_program

    program = export_program(model)  # torch.export.ExportedProgram
    logits = program.module()(images)  # == model.predict_logits(images, deterministic=True)
    torch.export.save(program, "model.pt2")
    export_onnx(model, "model.onnx")  # input "images" (B, C, H, W), output "logits" (B, K)
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.modules import BackpropModule, ContinuousNoPropModule, NoPropModule
from noprop_lightning.schedules import Sampler, check_sampler

__all__ = ["InferenceChain", "export_onnx", "export_program"]

#: The packages ``torch.onnx.export`` (its ``torch.export``-based exporter) needs.
ONNX_PACKAGES = ("onnx", "onnxscript")
INSTALL_HINT = 'pip install "noprop-lightning[export]"'
Exportable = NoPropModule | ContinuousNoPropModule | BackpropModule


class InferenceChain(nn.Module):
    """A module's deterministic inference as a plain ``nn.Module``: images -> logits.

    Holds the module (so its weights), runs nothing but its inference code and never
    takes labels. See the module docstring for what each kind of model computes.

    Args:
        module: A NoProp-DT, NoProp-CT, NoProp-FM or backprop module.
        steps: Sampler steps of NoProp-CT/FM (default ``inference.steps``).
        sampler: ``"euler"`` or ``"heun"`` for NoProp-CT/FM (default ``inference.sampler``).

    Raises:
        ConfigurationError: For another kind of module, or ``steps`` / ``sampler`` given
            for a model without an ODE sampler, or an invalid sampler.
    """

    def __init__(
        self, module: Exportable, steps: int | None = None, sampler: Sampler | None = None
    ) -> None:
        super().__init__()
        if not isinstance(module, (NoPropModule, ContinuousNoPropModule, BackpropModule)):
            raise ConfigurationError(
                f"cannot export {type(module).__name__}: export takes a NoPropModule, "
                "NoPropCTModule, NoPropFMModule or BackpropModule"
            )
        if isinstance(module, ContinuousNoPropModule):
            steps = module.inference_steps if steps is None else steps
            sampler = module.sampler if sampler is None else sampler
            check_sampler(sampler, steps)
        elif steps is not None or sampler is not None:
            raise ConfigurationError(
                f"steps and sampler set the ODE sampler of NoProp-CT/FM; {type(module).__name__}"
                " has none (its inference is a fixed chain)"
            )
        self.model = module
        self.steps = steps
        self.sampler = sampler

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` for images ``(B, C, H, W)``."""
        model = self.model
        if isinstance(model, NoPropModule):
            return model.predict_logits(images, deterministic=True)
        if isinstance(model, ContinuousNoPropModule):
            z0 = images.new_zeros(images.shape[0], model.embed_dim)
            return model.predict_logits(images, self.steps, self.sampler, z0)
        return model.predict_logits(images)


@contextlib.contextmanager
def _captured(module: Exportable) -> Iterator[None]:
    """Eval mode, no autograd and torch's diffusion ops while the module is captured."""
    training = module.training
    objective = getattr(module, "objective", None)
    backend = getattr(objective, "backend", "torch")
    try:
        module.eval()
        if backend != "torch":  # Numba kernels cannot be traced; the torch ops compute the same
            objective.use_backend("torch")
        with torch.no_grad():
            yield
    finally:
        if backend != "torch":
            objective.use_backend(backend)
        module.train(training)


def example_images(module: Exportable, batch_size: int) -> torch.Tensor:
    """A batch of zero images of the module's shape, on its device and in its dtype."""
    param = next(module.parameters())
    shape = (batch_size, module.in_channels, module.image_size, module.image_size)
    return torch.zeros(shape, device=param.device, dtype=param.dtype)


def export_program(
    module: Exportable,
    *,
    example_batch_size: int = 2,
    deterministic: bool = True,
    steps: int | None = None,
    sampler: Sampler | None = None,
) -> torch.export.ExportedProgram:
    """Capture the module's deterministic inference with ``torch.export``.

    Args:
        module: A NoProp-DT, NoProp-CT, NoProp-FM or backprop module (its mode and
            diffusion backend are restored afterwards).
        example_batch_size: Batch size of the example input, >= 2 (``torch.export``
            specialises a size-1 dimension); the exported batch dimension is dynamic
            (any size >= 1).
        deterministic: Must be ``True``: the stochastic chain is not a pure function.
        steps: NoProp-CT/FM sampler steps (default ``inference.steps``).
        sampler: NoProp-CT/FM ``"euler"`` or ``"heun"`` (default ``inference.sampler``).

    Returns:
        The program; ``program.module()(images)`` gives the logits, ``torch.export.save``
        writes it.

    Raises:
        ConfigurationError: ``deterministic=False``, ``example_batch_size < 2``, or what
            :class:`InferenceChain` refuses.
    """
    if not deterministic:
        raise ConfigurationError(
            "stochastic inference draws z_0 and the noise of every step from a random "
            "generator at each call, so it cannot be exported as a function of the images; "
            "export the deterministic chain (deterministic=True: z_0 = 0, no noise)"
        )
    if isinstance(example_batch_size, bool) or not isinstance(example_batch_size, int):
        raise ConfigurationError(f"example_batch_size must be an int, got {example_batch_size!r}")
    if example_batch_size < 2:
        raise ConfigurationError(
            f"example_batch_size must be >= 2 (torch.export fixes a dimension of size 1), "
            f"got {example_batch_size}; the exported program still takes any batch size"
        )
    chain = InferenceChain(module, steps, sampler)
    images = example_images(module, example_batch_size)
    batch = torch.export.Dim("batch", min=1)
    with _captured(module):
        return torch.export.export(chain, (images,), dynamic_shapes=({0: batch},))


def export_onnx(
    module: Exportable,
    path: str | Path,
    *,
    example_batch_size: int = 2,
    deterministic: bool = True,
    steps: int | None = None,
    sampler: Sampler | None = None,
    opset_version: int | None = None,
) -> Path:
    """Write the module's deterministic inference as one ONNX file.

    The graph is :func:`export_program`'s, translated by ``torch.onnx.export`` (its
    ``torch.export``-based exporter). Input ``images`` ``(batch, C, H, W)``, output
    ``logits`` ``(batch, K)``, batch dimension dynamic; the weights are inside the file.

    Args:
        module: See :func:`export_program`.
        path: The ``.onnx`` file to write (its folder is created).
        example_batch_size: See :func:`export_program`.
        deterministic: See :func:`export_program`.
        steps: See :func:`export_program`.
        sampler: See :func:`export_program`.
        opset_version: ONNX opset (default: torch's).

    Returns:
        The path written.

    Raises:
        ConfigurationError: ``onnx`` or ``onnxscript`` is not installed, the path cannot
            be written, or what :func:`export_program` refuses.
    """
    missing = [name for name in ONNX_PACKAGES if not _importable(name)]
    if missing:
        raise ConfigurationError(
            f"ONNX export needs the package(s) {', '.join(missing)} (torch.onnx's exporter): "
            f"{INSTALL_HINT}"
        )
    path = Path(path)
    if path.is_dir():
        raise ConfigurationError(f"cannot write the ONNX file {path}: it is a folder")
    program = export_program(
        module,
        example_batch_size=example_batch_size,
        deterministic=deterministic,
        steps=steps,
        sampler=sampler,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx_program = torch.onnx.export(
            program,
            f=None,
            input_names=["images"],
            output_names=["logits"],
            opset_version=opset_version,
            dynamo=True,
            verbose=False,
        )
        assert onnx_program is not None
        onnx_program.save(str(path), external_data=False)
    except OSError as err:
        raise ConfigurationError(f"cannot write the ONNX file {path}: {err}") from err
    return path


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
