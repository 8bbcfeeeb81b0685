"""``python -m noprop_lightning.cli fit|validate|test|predict ...``: the LightningCLI."""

from noprop_lightning.cli import main

main()
