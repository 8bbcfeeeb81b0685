"""Validated settings: the checks every option goes through, and a base for settings groups.

A settings group is a small frozen dataclass (network shape, execution path, objective
hyper-parameters, sampler) passed as one constructor argument. LightningCLI (jsonargparse)
reads a dataclass argument as a nested group, so a config writes

.. code-block:: yaml

    network:
      encoder: mlp
      hidden: 256

and the command line ``--model.init_args.network.hidden 256``. Every field is checked when
the dataclass is built, so a bad value fails before any tensor is allocated. Checkpoints
store a group as a plain dict (:meth:`Settings.to_hparams`), which ``load_from_checkpoint``
hands back and :meth:`Settings.coerce` turns into the dataclass again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar, get_args

from noprop_lightning.errors import ConfigurationError

_S = TypeVar("_S", bound="Settings")


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise :class:`ConfigurationError` unless ``value`` is one of the ``Literal`` ``choices``.

    Args:
        name: The option's name, for the message.
        value: The given value.
        choices: A ``typing.Literal[...]`` type (its arguments are the allowed values).
    """
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigurationError(
            f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        )


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as an ``int``; raise :class:`ConfigurationError` unless >= ``minimum``."""
    whole = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and int(value) == value
    )
    if not whole or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int = 1) -> int | None:
    """:func:`check_int` that lets ``None`` (meaning "the default") through."""
    return None if value is None else check_int(name, value, minimum)


def check_number(
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
) -> float:
    """Return ``value`` as a finite ``float`` inside the given bounds.

    Args:
        name: The option's name, for the message.
        value: The given value.
        above: Exclusive lower bound.
        at_least: Inclusive lower bound.
        below: Exclusive upper bound.

    Raises:
        ConfigurationError: Naming the option, the value and the allowed range (also for
            NaN and infinities, which would otherwise surface later as a NaN loss).
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    ok = math.isfinite(number) and not isinstance(value, bool)
    ok = ok and (above is None or number > above) and (at_least is None or number >= at_least)
    ok = ok and (below is None or number < below)
    if not ok:
        bounds = [
            f"> {above}" if above is not None else "",
            f">= {at_least}" if at_least is not None else "",
        ]
        bounds.append(f"< {below}" if below is not None else "")
        rule = " and ".join(b for b in bounds if b) or "finite"
        raise ConfigurationError(f"{name} must be a finite number {rule}, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of the settings groups: conversion from and to checkpoint hyper-parameters."""

    @classmethod
    def coerce(cls: type[_S], value: _S | Mapping[str, Any] | None) -> _S:
        """Return ``value`` as an instance of ``cls`` (``None``: the defaults).

        Args:
            value: An instance, or a mapping of its fields (how checkpoints store it).

        Raises:
            ConfigurationError: For unknown fields or a value of another kind.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                f"expected {cls.__name__} settings (an object or a mapping with the fields "
                f"{', '.join(names)}), got {value!r}"
            )
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigurationError(
                f"unknown {cls.__name__} field(s) {', '.join(unknown)}; the fields are "
                f"{', '.join(names)}"
            )
        return cls(**dict(value))

    def to_hparams(self) -> dict[str, Any]:
        """The settings as a plain dict of builtins (safe for ``torch.load(weights_only=True)``)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }
