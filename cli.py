"""Entry point: ``python cli.py fit --config configs/quickstart.yaml``."""

from noprop_lightning.cli import main

if __name__ == "__main__":
    main()
