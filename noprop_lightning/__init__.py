"""noprop-lightning: NoProp and backprop image classifiers in PyTorch Lightning.

The names below are imported on first use (PEP 562), so ``import noprop_lightning`` is cheap
and loads neither Lightning, Numba, scikit-learn nor matplotlib; the plain-torch layers
(:mod:`noprop_lightning.objectives`, :mod:`noprop_lightning.execution`, ...) load without
Lightning, Numba is imported when ``diffusion_backend: numba`` is chosen, and scikit-learn
when the digits data are read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.7.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "BackpropModule": "noprop_lightning.modules",
    "BlockNetwork": "noprop_lightning.nets",
    "CIFAR100DataModule": "noprop_lightning.data",
    "CIFAR10DataModule": "noprop_lightning.data",
    "CTObjective": "noprop_lightning.objectives",
    "CTSettings": "noprop_lightning.objectives",
    "ClassifierModule": "noprop_lightning.modules",
    "ConfigurationError": "noprop_lightning.errors",
    "ConvEncoder": "noprop_lightning.nets",
    "CosineSchedule": "noprop_lightning.schedules",
    "DTObjective": "noprop_lightning.objectives",
    "DTSettings": "noprop_lightning.objectives",
    "DatasetNotFoundError": "noprop_lightning.errors",
    "DenoisingBlock": "noprop_lightning.nets",
    "DigitsDataModule": "noprop_lightning.data",
    "EpochTimer": "noprop_lightning.callbacks",
    "ExecutionSettings": "noprop_lightning.execution",
    "FMObjective": "noprop_lightning.objectives",
    "FMSettings": "noprop_lightning.objectives",
    "FlowMatchingPath": "noprop_lightning.schedules",
    "ImageClassificationDataModule": "noprop_lightning.data",
    "LabelEmbedding": "noprop_lightning.nets",
    "LastCheckpoint": "noprop_lightning.callbacks",
    "LearnableSchedule": "noprop_lightning.schedules",
    "MNISTDataModule": "noprop_lightning.data",
    "NoPropCTModule": "noprop_lightning.modules",
    "NoPropFMModule": "noprop_lightning.modules",
    "NoPropModule": "noprop_lightning.modules",
    "NoPropUserError": "noprop_lightning.errors",
    "PeakMemoryMonitor": "noprop_lightning.callbacks",
    "RNGStateCheckpoint": "noprop_lightning.callbacks",
    "RunSummary": "noprop_lightning.callbacks",
    "SamplerSettings": "noprop_lightning.objectives",
    "TensorBoardHParams": "noprop_lightning.callbacks",
    "TimeConditionedBlock": "noprop_lightning.nets",
    "TimeNetwork": "noprop_lightning.nets",
}

__all__ = [
    "BackpropModule",
    "BlockNetwork",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "CTObjective",
    "CTSettings",
    "ClassifierModule",
    "ConfigurationError",
    "ConvEncoder",
    "CosineSchedule",
    "DTObjective",
    "DTSettings",
    "DatasetNotFoundError",
    "DenoisingBlock",
    "DigitsDataModule",
    "EpochTimer",
    "ExecutionSettings",
    "FMObjective",
    "FMSettings",
    "FlowMatchingPath",
    "ImageClassificationDataModule",
    "LabelEmbedding",
    "LastCheckpoint",
    "LearnableSchedule",
    "MNISTDataModule",
    "NoPropCTModule",
    "NoPropFMModule",
    "NoPropModule",
    "NoPropUserError",
    "PeakMemoryMonitor",
    "RNGStateCheckpoint",
    "RunSummary",
    "SamplerSettings",
    "TensorBoardHParams",
    "TimeConditionedBlock",
    "TimeNetwork",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'noprop_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # static analysers see the real imports
    from noprop_lightning.callbacks import (
        EpochTimer,
        LastCheckpoint,
        PeakMemoryMonitor,
        RNGStateCheckpoint,
        RunSummary,
        TensorBoardHParams,
    )
    from noprop_lightning.data import (
        CIFAR10DataModule,
        CIFAR100DataModule,
        DigitsDataModule,
        ImageClassificationDataModule,
        MNISTDataModule,
    )
    from noprop_lightning.errors import ConfigurationError, DatasetNotFoundError, NoPropUserError
    from noprop_lightning.execution import ExecutionSettings
    from noprop_lightning.modules import (
        BackpropModule,
        ClassifierModule,
        NoPropCTModule,
        NoPropFMModule,
        NoPropModule,
    )
    from noprop_lightning.nets import (
        BlockNetwork,
        ConvEncoder,
        DenoisingBlock,
        LabelEmbedding,
        TimeConditionedBlock,
        TimeNetwork,
    )
    from noprop_lightning.objectives import (
        CTObjective,
        CTSettings,
        DTObjective,
        DTSettings,
        FMObjective,
        FMSettings,
        SamplerSettings,
    )
    from noprop_lightning.schedules import CosineSchedule, FlowMatchingPath, LearnableSchedule
