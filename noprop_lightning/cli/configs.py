"""``--config`` taking a shipped config's name as well as a path."""

from __future__ import annotations

from typing import Any

from jsonargparse import ActionConfigFile

from noprop_lightning.config_files import resolve_config


class NamedConfigFile(ActionConfigFile):
    """jsonargparse's ``--config`` action, also accepting a shipped config's name."""

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: Any = None) -> None:
        """Resolve a shipped config's name to its path, then load it as usual."""
        if isinstance(values, str):
            values = resolve_config(values)
        super().__call__(parser, cfg, values, option_string)
