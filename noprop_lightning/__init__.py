"""noprop-lightning: NoProp and backprop image classifiers in PyTorch Lightning."""

from noprop_lightning.callbacks import (
    EpochTimer,
    PeakMemoryMonitor,
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
from noprop_lightning.diffusion import CosineSchedule, LearnableSchedule
from noprop_lightning.errors import ConfigurationError, DatasetNotFoundError, NoPropUserError
from noprop_lightning.modules import (
    BackpropModule,
    ClassifierModule,
    NoPropCTModule,
    NoPropFMModule,
    NoPropModule,
)
from noprop_lightning.nets import (
    ConvEncoder,
    DenoisingBlock,
    LabelEmbedding,
    TimeConditionedBlock,
)

__version__ = "0.1.0"

__all__ = [
    "BackpropModule",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "ClassifierModule",
    "ConfigurationError",
    "ConvEncoder",
    "CosineSchedule",
    "DatasetNotFoundError",
    "DenoisingBlock",
    "DigitsDataModule",
    "EpochTimer",
    "ImageClassificationDataModule",
    "LabelEmbedding",
    "LearnableSchedule",
    "MNISTDataModule",
    "NoPropCTModule",
    "NoPropFMModule",
    "NoPropModule",
    "NoPropUserError",
    "PeakMemoryMonitor",
    "RunSummary",
    "TensorBoardHParams",
    "TimeConditionedBlock",
]
