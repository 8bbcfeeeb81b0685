"""Data properties linked into the model, with errors instead of silent defaults.

jsonargparse's own ``link_arguments("data.num_classes", ...)`` skips a link whose source
attribute is missing (the model then trains with its default of 10 classes) and overwrites
a value the user gave the model. :class:`DataLinks` links the whole data module instead and
decides itself: the data module's value wins when it has one, an explicit model value is
used when it has not, and a disagreement or a value known to neither is an ``error:``.

:func:`link_data_properties` gives a plain ``LightningCLI`` subclass the same links in one
line.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from noprop_lightning.errors import ConfigurationError

#: The model arguments that the CLI links from the data module.
LINKED_DATA_PROPERTIES = ("num_classes", "in_channels", "image_size")


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


class DataLinks:
    """The values of :data:`LINKED_DATA_PROPERTIES` for one CLI run.

    Args:
        explicit: Model arguments the user stated (command line or config file), without
            defaults; the ``init_args`` of ``--model`` parsed with ``defaults=False``.
        accepted: Names among :data:`LINKED_DATA_PROPERTIES` that the model's class takes
            (a user's own LightningModule may take none of them: nothing is linked then).
    """

    def __init__(self, explicit: Mapping[str, Any] | None = None, accepted: Any = ()) -> None:
        self.update(explicit, accepted)

    def update(self, explicit: Mapping[str, Any] | None, accepted: Any) -> None:
        """Set what the user stated and what the model takes (once the command is parsed)."""
        self.explicit = dict(explicit or {})
        self.accepted = set(accepted)

    def value(self, name: str, datamodule: Any) -> Any:
        """The value of model argument ``name`` given the instantiated data module.

        Raises:
            ConfigurationError: The data module and the model settings disagree, or neither
                provides a value the model needs.
        """
        if name not in self.accepted:
            return None  # not a parameter of the model: jsonargparse ignores the link
        given = self.explicit.get(name)
        data_name = type(datamodule).__name__
        found = getattr(datamodule, name, None)
        if found is not None:
            if given is not None and _normalise(given) != _normalise(found):
                raise ConfigurationError(
                    f"model.init_args.{name} = {given!r} conflicts with the data module: "
                    f"{data_name}.{name} is {found!r}. The CLI takes {name} from the data "
                    f"module; drop it from the model settings (or change the data)."
                )
            return found
        if given is not None:
            return given
        raise ConfigurationError(
            f"the data module {data_name} has no `{name}`, which the model needs (the CLI "
            f"links num_classes, in_channels and image_size from the data module). Give "
            f"{data_name} a `{name}` attribute or property, or set --model.init_args.{name}."
        )


def link_data_properties(
    parser: Any, model: str = "model.init_args", links: DataLinks | None = None
) -> DataLinks:
    """Link the data module's ``num_classes``, ``in_channels`` and ``image_size`` into the model.

    For your own ``LightningCLI`` subclass, one line in ``add_arguments_to_parser``::

        class MyCLI(LightningCLI):
            def add_arguments_to_parser(self, parser):
                link_data_properties(parser)

    The values are read from the instantiated data module (``apply_on="instantiate"``), so a
    config states them once, in the data. Unlike ``parser.link_arguments("data.num_classes",
    ...)``, which skips a link whose attribute is missing (the model would then train with its
    default), a data module without one of the three stops the command with an error naming
    it (a :class:`~noprop_lightning.errors.ConfigurationError`, which jsonargparse passes on
    inside a ``ValueError``). The linked model
    arguments cannot be given in the config (jsonargparse's rule for link targets); the
    package's own CLI (:class:`~noprop_lightning.cli.NoPropCLI`) also accepts a model value
    where the data module has none.

    Args:
        parser: The ``LightningArgumentParser`` of ``add_arguments_to_parser``.
        model: Where the model's arguments are: ``"model.init_args"`` when the model is given
            by ``class_path`` (a ``LightningCLI`` without a model class, or with
            ``subclass_mode_model=True``), ``"model"`` for a fixed model class.
        links: Where the values come from (default: every linked property accepted, no
            model value given); the package's CLI passes its own and fills it in after
            parsing (:meth:`DataLinks.update`).

    Returns:
        The ``DataLinks`` the links read.
    """
    links = links if links is not None else DataLinks(accepted=LINKED_DATA_PROPERTIES)
    for name in LINKED_DATA_PROPERTIES:
        parser.link_arguments(
            "data",
            f"{model}.{name}",
            compute_fn=functools.partial(links.value, name),
            apply_on="instantiate",
        )
    return links
