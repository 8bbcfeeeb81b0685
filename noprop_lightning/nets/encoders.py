"""Image encoders: the paper's convolutional stack and small alternatives.

Every encoder maps an image batch ``(B, C, H, W)`` to features ``(B, out_features)``. Encoders
are plain ``nn.Module`` objects with no Lightning dependency so they can be reused anywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.nets.dropout import StreamDropout

#: A factory building an image encoder from ``(in_channels, image_size, out_features)``.
EncoderFactory = Callable[[int, int, int], nn.Module]


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
    """
    if encoder == "conv":
        return ConvEncoder(in_channels, image_size, out_features, channels, dropout, batch_norm)
    if encoder == "mlp":
        return MLPEncoder(in_channels, image_size, out_features, out_features, dropout, batch_norm)
    factory = import_encoder(encoder) if isinstance(encoder, str) else encoder
    if not callable(factory):
        raise ConfigurationError(
            f"unknown encoder {encoder!r}: use 'conv', 'mlp', an import path such as "
            "'my_pkg.MyEncoder', or a callable (in_channels, image_size, out_features) -> Module"
        )
    return factory(in_channels, image_size, out_features)


def import_encoder(path: str) -> EncoderFactory:
    """Import the encoder class or factory named by a dotted ``path``.

    Raises:
        ConfigurationError: If ``path`` is not a dotted name or cannot be imported.
    """
    module_name, _, name = path.rpartition(".")
    if not module_name or "<locals>" in path:
        raise ConfigurationError(
            f"unknown encoder {path!r}: use 'conv', 'mlp' or the import path of a class or "
            "factory defined at module level (e.g. 'my_pkg.MyEncoder'); a lambda or a local "
            "class cannot be re-imported, so pass it again (network=...) when loading"
        )
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
