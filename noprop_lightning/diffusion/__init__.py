from noprop_lightning.diffusion.schedule import CosineSchedule

__all__ = ["CosineSchedule"]
