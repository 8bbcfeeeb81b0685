"""Lightning callbacks that measure and summarise a run; usable in any Lightning project.

* :class:`EpochTimer`: ``time/*_epoch_s`` and ``throughput/*_samples_per_s`` per epoch, and
  ``epoch/*`` copies of the epoch-level scalars with the epoch as the step.
* :class:`PeakMemoryMonitor`: ``memory/*_peak_*_mib`` per epoch (CUDA peak, process RSS).
* :class:`RunSummary`: a rich table at the end of ``fit`` and ``test``.
* :class:`TensorBoardHParams`: the HPARAMS tab of TensorBoard, without ``hp_metric``.
* :class:`RNGStateCheckpoint`: the global RNG states in every checkpoint (exact resume).
* :class:`LastCheckpoint`: ``last.ckpt`` = the latest state (every epoch, on SIGTERM, ...).
* :class:`BestCheckpoint`: the best checkpoint by a metric, ties going to the later epoch.
* :class:`CompactModelSummary`: Lightning's model summary without empty columns and rows.
* :class:`ProgressBar`: Lightning's rich progress bar without ``v_num``; one line per epoch
  and per checkpoint saved where standard output is a file or a pipe.
* :class:`PredictionWriter`: ``predict``'s probabilities and classes to a CSV or tensor file.
* :class:`ChannelsLast`: convolution weights in channels-last layout (faster convolutions).
"""

from noprop_lightning.callbacks.atomic import AtomicCheckpointIO
from noprop_lightning.callbacks.best import BestCheckpoint
from noprop_lightning.callbacks.channels_last import ChannelsLast
from noprop_lightning.callbacks.checkpoint import RNGStateCheckpoint, check_checkpoint_matches
from noprop_lightning.callbacks.hparams import TensorBoardHParams
from noprop_lightning.callbacks.last import LastCheckpoint
from noprop_lightning.callbacks.memory import PeakMemoryMonitor, ProcessPeakRSS
from noprop_lightning.callbacks.model_summary import CompactModelSummary
from noprop_lightning.callbacks.predictions import PredictionWriter
from noprop_lightning.callbacks.progress import ProgressBar
from noprop_lightning.callbacks.summary import ModuleDescription, RunSummary, describe_module
from noprop_lightning.callbacks.timing import EpochTimer


def default_callbacks() -> list:
    """One instance of each measuring callback, in the order they should run."""
    return [
        EpochTimer(),
        PeakMemoryMonitor(),
        TensorBoardHParams(),
        RunSummary(),
        CompactModelSummary(),
    ]


__all__ = [
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "ChannelsLast",
    "CompactModelSummary",
    "EpochTimer",
    "LastCheckpoint",
    "ModuleDescription",
    "PeakMemoryMonitor",
    "PredictionWriter",
    "ProcessPeakRSS",
    "ProgressBar",
    "RNGStateCheckpoint",
    "RunSummary",
    "TensorBoardHParams",
    "check_checkpoint_matches",
    "default_callbacks",
    "describe_module",
]
