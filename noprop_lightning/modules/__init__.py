from noprop_lightning.modules.backprop import BackpropModule, ChainedBlocks, PlainCNN
from noprop_lightning.modules.base import ClassifierModule
from noprop_lightning.modules.continuous import (
    ContinuousNoPropModule,
    NoPropCTModule,
    NoPropFMModule,
)
from noprop_lightning.modules.noprop import NoPropModule
from noprop_lightning.modules.optim import paper_adam, paper_adamw

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
    "paper_adamw",
]
