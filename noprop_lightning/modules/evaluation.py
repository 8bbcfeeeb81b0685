"""Inference and evaluation of the package's LightningModules: validation, test and predict.

:class:`Evaluation` is a mixin of :class:`~noprop_lightning.modules.base.ClassifierModule`:
``predict_logits`` (run in eval mode: a subclass's own is wrapped), the validation, test and
predict steps that log loss and accuracy, and the seeded random stream of each evaluation
epoch's inference noise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from noprop_lightning.metric_names import LOSS, metric
from noprop_lightning.modules.eval_mode import in_eval_mode
from noprop_lightning.modules.guards import check_finite_images
from noprop_lightning.objectives.streams import stream_seed

#: Stream keys of the evaluation stages (distinct from any block index).
EVAL_STREAMS = {"val": 1 << 40, "test": (1 << 40) + 1, "predict": (1 << 40) + 2}


class Evaluation:
    """Mixin of a LightningModule (see the module docstring).

    The module gives ``unpack`` (a checked ``(x, y)`` batch), ``val_acc`` and ``test_acc``, and
    the run's seed (``_run_seed``, ``default_seed``).
    """

    #: The random stream of stochastic inference during a validation, test or predict epoch
    #: (``None`` outside one: the global generator).
    eval_generator: torch.Generator | None = None

    def start_eval_stream(self, stage: str) -> None:
        """Seed the inference noise of an evaluation epoch from the run's seed and ``stage``.

        So a stochastic model gives the same test accuracy after ``fit`` and in a standalone
        ``test`` of the same checkpoint, and evaluating draws nothing from the global
        generator (training's random streams do not depend on how often it validates).
        """
        seed = self._run_seed if self._run_seed is not None else self.default_seed()
        generator = torch.Generator(device=self.device)
        self.eval_generator = generator.manual_seed(stream_seed(seed, EVAL_STREAMS[stage]))

    def on_validation_epoch_start(self) -> None:
        """Seed the validation epoch's inference noise (see :meth:`start_eval_stream`)."""
        self.start_eval_stream("val")

    def on_test_epoch_start(self) -> None:
        """Seed the test epoch's inference noise (see :meth:`start_eval_stream`)."""
        self.start_eval_stream("test")

    def on_predict_epoch_start(self) -> None:
        """Seed the predict epoch's inference noise (see :meth:`start_eval_stream`)."""
        self.start_eval_stream("predict")

    def on_validation_epoch_end(self) -> None:
        """Back to the global generator outside evaluation."""
        self.eval_generator = None

    on_test_epoch_end = on_validation_epoch_end
    on_predict_epoch_end = on_validation_epoch_end

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)`` for images ``x``; must not use labels.

        Inference always runs in eval mode: a subclass's ``predict_logits`` is wrapped
        (:func:`~noprop_lightning.modules.eval_mode.in_eval_mode`), so a module in training
        mode (as ``load_from_checkpoint`` and ``trainer.fit`` leave it) runs without dropout
        and leaves BatchNorm's statistics unchanged. Stochastic inference still draws noise.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`predict_logits` (so it runs in eval mode too)."""
        return self.predict_logits(x)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap a subclass's own ``predict_logits`` to run in eval mode (see there)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("predict_logits")
        if own is not None:
            cls.predict_logits = in_eval_mode(own)

    def _eval_step(
        self, batch: Any, batch_idx: int, stage: str, accuracy: MulticlassAccuracy
    ) -> torch.Tensor:
        x, y = self.unpack(batch, batch_idx)
        check_finite_images(x, stage, batch_idx)
        logits = self.predict_logits(x)
        loss = F.cross_entropy(logits, y)
        accuracy.update(logits, y)
        self.log(metric(stage, LOSS), loss, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(metric(stage, "acc"), accuracy, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Run inference on a validation batch and log ``val/loss``, ``val/acc``."""
        return self._eval_step(batch, batch_idx, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Run inference on a test batch and log ``test/loss``, ``test/acc``."""
        return self._eval_step(batch, batch_idx, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities and predicted classes of a batch (labels, if any, are ignored).

        Returns:
            ``{"probs": (B, K) softmax probabilities, "pred": (B,) class indices}``; write
            them to a file with :class:`~noprop_lightning.callbacks.PredictionWriter`.
        """
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = torch.softmax(self.predict_logits(x), dim=-1)
        return {"probs": probs, "pred": probs.argmax(dim=-1)}
