"""``load_from_checkpoint`` that imports no code the checkpoint names (unless trusted)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from noprop_lightning.nets.encoders import encoders_from_checkpoint


class TrustedLoading:
    """Mixin of the package's LightningModules: the checkpoint's encoder name is checked.

    Lightning's ``load_from_checkpoint`` rebuilds the module from the checkpoint's
    hyper-parameters; its own allow-list keeps a checkpoint from choosing the module class
    or the instantiator, and this keeps it from choosing the encoder's code.
    """

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Any,
        *args: Any,
        trusted_encoders: Iterable[str] | str = (),
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, which imports no code the checkpoint names.

        A checkpoint names its encoder by import path (``network.encoder``). Only the
        package's own encoders (``conv``, ``mlp``) are built from that name; any other is
        refused (:class:`~noprop_lightning.nets.encoders.UntrustedEncoderError`, before
        anything is imported) unless the caller opts in: lists it in ``trusted_encoders``,
        or passes the network (``network={"encoder": MyEncoder, ...}``, whose encoder is
        then the caller's). The other arguments are Lightning's.

        Args:
            checkpoint_path: The checkpoint (file, ``block_parallel`` folder or file object).
            *args: Lightning's positional arguments (``map_location``, ...).
            trusted_encoders: Encoder import paths to build even though the checkpoint,
                not the caller, names them, e.g. ``["my_pkg.MyEncoder"]``.
            **kwargs: Lightning's keyword arguments and hyper-parameters to override.
        """
        trusted = {trusted_encoders} if isinstance(trusted_encoders, str) else set(trusted_encoders)
        network = kwargs.get("network")
        given = network.get("encoder") if isinstance(network, Mapping) else None
        given = getattr(network, "encoder", None) if given is None else given
        if isinstance(given, str):
            trusted.add(given)  # the caller's own choice
        named = isinstance(checkpoint_path, str | os.PathLike)
        origin = f"the checkpoint {checkpoint_path}" if named else "the checkpoint"
        with encoders_from_checkpoint(origin, trusted):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
