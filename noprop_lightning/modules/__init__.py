from noprop_lightning.modules.backprop import BackpropModule, ChainedBlocks, PlainCNN
from noprop_lightning.modules.base import ClassifierModule
from noprop_lightning.modules.noprop import NoPropModule

__all__ = ["BackpropModule", "ChainedBlocks", "ClassifierModule", "NoPropModule", "PlainCNN"]
