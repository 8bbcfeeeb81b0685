"""Network settings: the encoder and widths of the blocks, as one constructor argument."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from noprop_lightning.errors import ConfigurationError
from noprop_lightning.nets.encoders import resolve_encoder
from noprop_lightning.settings import Settings, check_choice, check_int, check_number

HeadInit = Literal["embedding", "default"]


@dataclasses.dataclass(frozen=True)
class NetworkSettings(Settings):
    """The image encoder and the width shared by every block.

    Attributes:
        encoder: ``"conv"`` (the paper's), ``"mlp"``, or the import path of a class or
            factory ``(in_channels, image_size, out_features) -> nn.Module`` (for example
            ``"my_pkg.MyEncoder"``; from Python also the class itself). A name read from a
            checkpoint is imported only if trusted.
        channels: Widths of the conv encoder's three layers (paper: 32, 64, 128).
        hidden: Feature width of the block (paper: 256).
        dropout: Dropout probability of the encoder, in ``[0, 1)``.
    """

    encoder: str = "conv"
    channels: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 256
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if not (isinstance(self.encoder, str) or callable(self.encoder)):
            raise ConfigurationError(
                f"network.encoder must be 'conv', 'mlp' or an import path, got {self.encoder!r}"
            )
        # Before any block is built: a name is imported (unless read from an untrusted
        # checkpoint) and checked to be an encoder, not any callable such as os.system.
        resolve_encoder(self.encoder)
        channels = tuple(self.channels)
        if len(channels) != 3:
            raise ConfigurationError(
                f"network.channels needs 3 widths (one per convolution), got {list(channels)}"
            )
        widths = tuple(check_int("network.channels", c) for c in channels)
        object.__setattr__(self, "channels", widths)
        object.__setattr__(self, "hidden", check_int("network.hidden", self.hidden))
        dropout = check_number("network.dropout", self.dropout, at_least=0.0, below=1.0)
        object.__setattr__(self, "dropout", dropout)

    def to_hparams(self) -> dict[str, Any]:
        """See :meth:`Settings.to_hparams`; a callable encoder becomes its import path."""
        return {**super().to_hparams(), "encoder": encoder_name(self.encoder)}


@dataclasses.dataclass(frozen=True)
class BlockNetwork(NetworkSettings):
    """Settings of the NoProp-DT block (and of the backprop baseline built from it).

    Attributes:
        head_init: The classifier head on ``z_T`` starts as a nearest-embedding reader,
            or with PyTorch's random init (:class:`~noprop_lightning.nets.ClassifierHead`).
    """

    head_init: HeadInit = "embedding"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("network.head_init", self.head_init, HeadInit)


@dataclasses.dataclass(frozen=True)
class TimeNetwork(NetworkSettings):
    """Settings of the time-conditioned NoProp-CT / NoProp-FM network (no BatchNorm).

    Attributes:
        time_dim: Size of the sinusoidal time embedding (paper: 64), at least 2.
    """

    time_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "time_dim", check_int("network.time_dim", self.time_dim, 2))


def encoder_name(encoder: Any) -> str:
    """``encoder`` as the string a config holds: itself, or a callable's import path.

    A callable without an importable path (a lambda, a class defined inside a function) is
    named all the same; :func:`~noprop_lightning.nets.build_encoder` then explains, when a
    checkpoint is loaded, that it cannot be imported and must be passed again.
    """
    if isinstance(encoder, str):
        return encoder
    module = getattr(encoder, "__module__", None) or "<unknown module>"
    qualname = getattr(encoder, "__qualname__", None) or type(encoder).__qualname__
    return f"{module}.{qualname}"
