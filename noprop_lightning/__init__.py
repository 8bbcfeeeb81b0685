"""noprop-lightning: NoProp and backprop image classifiers in PyTorch Lightning.

Importing the package loads neither Numba nor scikit-learn (nor the report's plotting
code): the Numba backend is imported when ``diffusion_backend: numba`` is chosen, and
scikit-learn when the digits data are loaded.
"""

from noprop_lightning.callbacks import (
    EpochTimer,
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

__version__ = "0.2.0"

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
