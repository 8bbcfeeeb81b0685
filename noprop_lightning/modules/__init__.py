from noprop_lightning.modules.backprop import BackpropModule, ChainedBlocks, PlainCNN
from noprop_lightning.modules.base import ClassifierModule
from noprop_lightning.modules.continuous import (
    ContinuousNoPropModule,
    NoPropCTModule,
    NoPropFMModule,
    paper_adam,
)
from noprop_lightning.modules.noprop import NoPropModule

__all__ = [
    "BackpropModule",
    "ChainedBlocks",
    "ClassifierModule",
    "ContinuousNoPropModule",
    "NoPropCTModule",
    "NoPropFMModule",
    "NoPropModule",
    "PlainCNN",
    "paper_adam",
]
