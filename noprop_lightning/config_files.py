"""The shipped configs: inside the package, addressable by name (``--config quickstart``)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from noprop_lightning.errors import ConfigurationError

#: The folder of the shipped YAML configs (installed with the package).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: What a config *name* looks like (anything else is a path or an inline YAML string).
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def shipped_configs() -> dict[str, Path]:
    """The shipped configs by name (file stem), sorted."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def describe(path: Path, width: int = 90) -> str:
    """The first sentence of a config's leading comment (what it trains, on what)."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    sentence = text.split(". ", 1)[0].rstrip(".")
    if len(sentence) > width:
        sentence = sentence[: width - 3].rsplit(" ", 1)[0] + " ..."
    return sentence


def resolve_config(value: str) -> str:
    """A ``--config`` value as a path: an existing file, or the shipped config of that name.

    Args:
        value: What followed ``--config``: a path, a shipped config's name (``quickstart``
            or ``quickstart.yaml``), or an inline YAML string.

    Returns:
        ``value`` itself when it names an existing file or is not a plain name, else the
        path of the shipped config.

    Raises:
        ConfigurationError: ``value`` is a plain name that is neither a file here nor a
            shipped config, or a file that holds nothing (jsonargparse would answer
            "Unexpected config").
    """
    path = Path(value)
    if path.is_file():
        if not path.read_text(errors="replace").strip():
            raise ConfigurationError(
                f"the config file {value} is empty: give a LightningCLI config (see "
                "`noprop-lightning configs`, or `noprop-lightning fit --print_config` for one "
                "with every setting)."
            )
        return value
    if path.exists() or not _NAME.fullmatch(value):
        return value
    configs = shipped_configs()
    name = value.removesuffix(".yaml").removesuffix(".yml")
    if name in configs:
        return str(configs[name])
    close = difflib.get_close_matches(name, list(configs), n=1)
    hint = f"Did you mean {close[0]}? " if close else ""
    raise ConfigurationError(
        f"no config file {value!r} here and no shipped config of that name. {hint}Shipped "
        f"configs: {', '.join(configs)} (`noprop-lightning configs` describes them)."
    )
