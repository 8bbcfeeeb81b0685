"""The runtime settings of NoProp-DT: its inference mode and execution, and their checks.

:class:`DTRuntimeSettings` is a mixin of :class:`~noprop_lightning.modules.noprop.NoPropModule`:
``inference`` and ``execution`` may be reassigned at any time (they choose how the model runs,
not what it is), and what they cannot honour is refused: ``block_parallel`` with selected
blocks, the numba backend on an accelerator.
"""

from __future__ import annotations

from typing import Any, Literal

from noprop_lightning.distributed import BlockLayout
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution import ExecutionSettings, executor_for
from noprop_lightning.settings import check_choice

InferenceMode = Literal["stochastic", "deterministic"]


class DTRuntimeSettings:
    """Mixin of a LightningModule of NoProp-DT blocks (see the module docstring).

    The module gives ``num_blocks``, ``one_block_per_batch``, ``objective``, ``use_layout``
    and ``record_settings``.
    """

    @property
    def inference(self) -> InferenceMode:
        """``"stochastic"`` or ``"deterministic"``; may be reassigned at any time."""
        return self._inference

    @inference.setter
    def inference(self, mode: InferenceMode) -> None:
        check_choice("inference", mode, InferenceMode)
        self._inference = mode
        self._hparams["inference"] = self._hparams_initial["inference"] = mode

    @property
    def execution(self) -> ExecutionSettings:
        """The execution path and diffusion backend; may be reassigned at any time."""
        return self._execution

    @execution.setter
    def execution(self, settings: ExecutionSettings | dict[str, Any]) -> None:
        settings = ExecutionSettings.coerce(settings)
        layout = BlockLayout.requested(self.num_blocks, settings.train_blocks, settings.train_head)
        selected = settings.train_blocks is not None or not settings.train_head
        if selected and self.one_block_per_batch:
            raise ConfigurationError(
                "execution.train_blocks / train_head select the blocks a run trains; "
                "block_order='random' would need every run's draw: use block_order='all'"
            )
        self.executor = executor_for(settings)
        self.objective.use_backend(settings.diffusion_backend)
        self._execution = settings
        self.use_layout(layout)
        self.record_settings(execution=settings)

    def check_block_parallel(self) -> None:
        """Refuse settings that ``block_parallel`` cannot honour."""
        if self.one_block_per_batch:
            raise ConfigurationError(
                "strategy 'block_parallel' needs block_order='all': with 'random' the rank "
                "owning the drawn block would train while the others wait, and every rank "
                "would need the draw (use strategy 'ddp_find_unused_parameters_true' for it)"
            )
        if self.execution.train_blocks is not None or not self.execution.train_head:
            raise ConfigurationError(
                "strategy 'block_parallel' assigns the blocks to ranks itself: remove "
                "execution.train_blocks / train_head (they are for separate one-process jobs)"
            )

    def setup(self, stage: str) -> None:
        """Initialise prototype embeddings from the data module's training images.

        Raises:
            ConfigurationError: If ``diffusion_backend="numba"`` is asked to run on an
                accelerator (its kernels are CPU-only; it never falls back to torch).
        """
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        if self.objective.backend == "numba" and device is not None and device.type != "cpu":
            raise ConfigurationError(
                f"diffusion_backend='numba' has CPU kernels only, but the trainer runs on "
                f"{device}: use diffusion_backend='torch' there"
            )
        super().setup(stage)
