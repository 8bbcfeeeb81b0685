"""Image encoders: the paper's convolutional stack and small alternatives.

Every encoder maps an image batch ``(B, C, H, W)`` to features ``(B, out_features)``. Encoders
are plain ``nn.Module`` objects with no Lightning dependency so they can be reused anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from noprop_lightning.errors import CheckpointError, ConfigurationError
from noprop_lightning.nets.dropout import StreamDropout

#: A factory building an image encoder from ``(in_channels, image_size, out_features)``.
EncoderFactory = Callable[[int, int, int], nn.Module]

#: What an encoder must be, for the messages that refuse something else.
ENCODER_CONTRACT = (
    "an encoder is 'conv', 'mlp', or a torch.nn.Module subclass (or a callable returning "
    "one) called as (in_channels, image_size, out_features), whose module maps images "
    "(B, C, H, W) to features (B, out_features)"
)


class ConvEncoder(nn.Module):
    """The convolutional image path of the paper's DT block (Figure 6).

    conv3x3(c1), ReLU, maxpool2, dropout; conv3x3(c2), ReLU, dropout; conv3x3(c3), ReLU,
    maxpool2, dropout; flatten; Linear(out_features); optional BatchNorm1d. The paper uses
    ``channels=(32, 64, 128)``, ``dropout=0.2``, ``out_features=256`` and BatchNorm (DT) or no
    BatchNorm (CT/FM).

    Args:
        in_channels: Number of image channels.
        image_size: Height (= width) of the input images.
        out_features: Size of the output feature vector.
        channels: Output channels of the three convolutions.
        dropout: Dropout probability after each convolution stage.
        batch_norm: Whether to end with ``BatchNorm1d``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        out_features: int = 256,
        channels: Sequence[int] = (32, 64, 128),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ConfigurationError(f"channels must have 3 entries, got {list(channels)}")
        if image_size < 4:
            raise ConfigurationError(
                f"image_size must be >= 4 for two 2x2 poolings, got {image_size}"
            )
        c1, c2, c3 = (int(c) for c in channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            StreamDropout(dropout),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(inplace=True),
            StreamDropout(dropout),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            StreamDropout(dropout),
            nn.Flatten(),
        )
        spatial = image_size // 2 // 2
        layers: list[nn.Module] = [nn.Linear(c3 * spatial * spatial, out_features)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(out_features))
        self.project = nn.Sequential(*layers)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images ``(B, C, H, W)`` into ``(B, out_features)``."""
        return self.project(self.features(x))


class MLPEncoder(nn.Module):
    """A flatten + two-layer MLP encoder; a cheap alternative for tiny images.

    Args:
        in_channels: Number of image channels.
        image_size: Height (= width) of the input images.
        out_features: Size of the output feature vector.
        hidden: Hidden width.
        dropout: Dropout probability.
        batch_norm: Whether to end with ``BatchNorm1d``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        out_features: int = 256,
        hidden: int = 256,
        dropout: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.ReLU(inplace=True),
            StreamDropout(dropout),
            nn.Linear(hidden, out_features),
        ]
        if batch_norm:
            layers.append(nn.BatchNorm1d(out_features))
        self.net = nn.Sequential(*layers)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images ``(B, C, H, W)`` into ``(B, out_features)``."""
        return self.net(x)


#: The package's own encoders under every import path a checkpoint may name them by
#: (``encoder_name`` of the class); resolving these imports nothing.
PACKAGE_ENCODERS: dict[str, type[nn.Module]] = {
    f"{prefix}.{cls.__name__}": cls
    for cls in (ConvEncoder, MLPEncoder)
    for prefix in ("noprop_lightning.nets.encoders", "noprop_lightning.nets", "noprop_lightning")
}


class UntrustedEncoderError(CheckpointError):
    """A checkpoint names an encoder that is not the package's own and was not trusted.

    Loading it would import (and run) the code it names; nothing was imported.
    """


@dataclasses.dataclass(frozen=True)
class _Trust:
    names: frozenset[str]
    origin: str
    hint: str


_TRUST: contextvars.ContextVar[_Trust | None] = contextvars.ContextVar(
    "noprop_lightning_encoder_trust", default=None
)


@contextlib.contextmanager
def encoders_from_checkpoint(
    origin: str, trusted: Iterable[str] = (), hint: str = ""
) -> Iterator[None]:
    """While active, an encoder named by a string may only be the package's own or ``trusted``.

    Settings read from a checkpoint are built inside this context: an encoder import path
    they name (``network.encoder``) that is neither one of :data:`PACKAGE_ENCODERS` (or
    ``"conv"`` / ``"mlp"``) nor listed in ``trusted`` is refused with
    :class:`UntrustedEncoderError` before anything is imported. Encoders given as classes
    or callables are the caller's own and are not affected.

    Args:
        origin: Where the names come from, for the message (``"the checkpoint X"``).
        trusted: Import paths the caller trusts (``"my_pkg.MyEncoder"``).
        hint: How to opt in, for the message (the default names ``load_from_checkpoint``'s
            arguments).
    """
    token = _TRUST.set(_Trust(frozenset(trusted), origin, hint or _LOAD_HINT))
    try:
        yield
    finally:
        _TRUST.reset(token)


_LOAD_HINT = (
    "If you trust that code, pass load_from_checkpoint(path, trusted_encoders=[{name!r}]), "
    "or pass the encoder itself: load_from_checkpoint(path, network={{'encoder': MyEncoder, "
    "...}})"
)


def untrusted_encoder_message(name: str, origin: str, hint: str) -> str:
    """The one-paragraph refusal of an encoder import path from ``origin``."""
    return (
        f"{origin} names the encoder {name!r}, which is not one of noprop-lightning's "
        "('conv', 'mlp'): loading a checkpoint imports no code it names unless you trust it, "
        f"and nothing was imported. {hint.format(name=name)}"
    )


def build_encoder(
    encoder: str | EncoderFactory,
    in_channels: int,
    image_size: int,
    out_features: int,
    channels: Sequence[int] = (32, 64, 128),
    dropout: float = 0.2,
    batch_norm: bool = True,
) -> nn.Module:
    """Build an image encoder by name (``"conv"``, ``"mlp"``) or from a user factory.

    Args:
        encoder: ``"conv"`` (the paper's stack), ``"mlp"``, the import path of a class or
            factory, or a callable ``(in_channels, image_size, out_features) -> nn.Module``
            returning a module that maps ``(B, C, H, W)`` to ``(B, out_features)``.
        in_channels: Number of image channels.
        image_size: Height (= width) of the images.
        out_features: Output feature size.
        channels: Convolution widths for ``"conv"``.
        dropout: Dropout probability for the built-in encoders.
        batch_norm: Whether built-in encoders end with BatchNorm.

    Returns:
        The encoder module.

    Raises:
        ConfigurationError: ``encoder`` is not an encoder (see :func:`resolve_encoder`), or
            the factory returned something other than an ``nn.Module``.
        UntrustedEncoderError: A name read from a checkpoint that is not trusted
            (:func:`encoders_from_checkpoint`).
    """
    if encoder == "conv":
        return ConvEncoder(in_channels, image_size, out_features, channels, dropout, batch_norm)
    if encoder == "mlp":
        return MLPEncoder(in_channels, image_size, out_features, out_features, dropout, batch_norm)
    factory = resolve_encoder(encoder)
    module = factory(in_channels, image_size, out_features)
    if not isinstance(module, nn.Module):
        raise ConfigurationError(
            f"the encoder {_shown(encoder)} returned {type(module).__name__}, not a "
            f"torch.nn.Module: {ENCODER_CONTRACT}"
        )
    return module


def resolve_encoder(encoder: str | EncoderFactory) -> EncoderFactory:
    """The class or factory ``encoder`` names, checked to be an encoder (nothing is built).

    ``"conv"`` / ``"mlp"`` and the import paths of :data:`PACKAGE_ENCODERS` resolve without
    an import; another name is imported (:func:`import_encoder`, which refuses names read
    from a checkpoint unless trusted). A class must subclass ``torch.nn.Module``; another
    callable must take ``(in_channels, image_size, out_features)`` and be Python code (a
    built-in such as ``os.system`` or ``print`` is no encoder).

    Raises:
        ConfigurationError: For anything that is not an encoder, naming what one must be.
        UntrustedEncoderError: See :func:`import_encoder`.
    """
    if encoder == "conv":
        return ConvEncoder
    if encoder == "mlp":
        return MLPEncoder
    if isinstance(encoder, str):
        factory: Any = PACKAGE_ENCODERS.get(encoder) or import_encoder(encoder)
    else:
        factory = encoder
    problem = _not_an_encoder(factory)
    if problem is not None:
        raise ConfigurationError(
            f"network.encoder {_shown(encoder)} is not an encoder ({problem}): {ENCODER_CONTRACT}"
        )
    return factory


def _shown(encoder: Any) -> str:
    if isinstance(encoder, str):
        return repr(encoder)
    name = getattr(encoder, "__qualname__", None) or type(encoder).__qualname__
    module = getattr(encoder, "__module__", None)
    return repr(f"{module}.{name}" if module else name)


def _not_an_encoder(factory: Any) -> str | None:
    """Why ``factory`` is no encoder class or factory, or ``None`` if it can be one."""
    if isinstance(factory, type):
        if not issubclass(factory, nn.Module):
            return f"the class {factory.__name__} is not a torch.nn.Module"
    elif not callable(factory):
        return f"a {type(factory).__name__}, not callable"
    elif inspect.isbuiltin(factory) or inspect.ismethoddescriptor(factory):
        return "a built-in function"
    try:
        inspect.signature(factory).bind(1, 1, 1)
    except TypeError:
        return (
            "it cannot be called with the three arguments (in_channels, image_size, out_features)"
        )
    except ValueError:  # no signature to inspect (some C callables): judged when called
        pass
    return None


def import_encoder(path: str) -> EncoderFactory:
    """Import the encoder class or factory named by a dotted ``path``.

    Inside :func:`encoders_from_checkpoint` (names read from a checkpoint) only trusted
    names are imported: the refusal comes before any import.

    Raises:
        ConfigurationError: If ``path`` is not a dotted name or cannot be imported.
        UntrustedEncoderError: If ``path`` comes from a checkpoint and is not trusted.
    """
    module_name, _, name = path.rpartition(".")
    if not module_name or "<locals>" in path:
        raise ConfigurationError(
            f"unknown encoder {path!r}: use 'conv', 'mlp' or the import path of a class or "
            "factory defined at module level (e.g. 'my_pkg.MyEncoder'); a lambda or a local "
            "class cannot be re-imported, so pass it again (network=...) when loading"
        )
    trust = _TRUST.get()
    if trust is not None and path not in trust.names:
        raise UntrustedEncoderError(untrusted_encoder_message(path, trust.origin, trust.hint))
    try:
        return getattr(importlib.import_module(module_name), name)
    except AttributeError as err:
        if module_name == "__main__":
            raise ConfigurationError(
                f"the encoder {path!r} was defined in the script that trained the model, and "
                "this process's script does not define it: move the class into an importable "
                "module (e.g. my_encoders.py), or pass it again when loading: "
                "load_from_checkpoint(path, network={'encoder': MyEncoder, ...})"
            ) from err
        raise ConfigurationError(
            f"the encoder {path!r} cannot be imported ({type(err).__name__}: {err}): check the "
            "spelling, and that its package is installed or on PYTHONPATH"
        ) from err
    except ImportError as err:
        raise ConfigurationError(
            f"the encoder {path!r} cannot be imported ({type(err).__name__}: {err}): check the "
            "spelling, and that its package is installed or on PYTHONPATH"
        ) from err
