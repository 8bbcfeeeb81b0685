"""How a module whose blocks are spread over ranks logs its losses (``block_parallel``).

:class:`SpreadLosses` is a mixin of :class:`~noprop_lightning.modules.blockwise.
BlockwiseModule`: every rank logs every block's key, scaled so that Lightning's mean over the
ranks is the owners' mean, and the step curves cost one small collective every
``log_every_n_steps`` training batches only.
"""

from __future__ import annotations

import torch

from noprop_lightning.metric_names import KL, LOSS_HEAD, block_loss


class SpreadLosses:
    """Mixin of a LightningModule of blocks (see the module docstring).

    The module gives ``plan``, ``runtime``, ``blocks`` and ``block_tag``, the logging of
    :class:`~noprop_lightning.modules.base.ClassifierModule` and the training-batch counter
    of its random streams (``_stream_step``).
    """

    def log_spread_losses(
        self,
        total: torch.Tensor,
        by_block: dict[int, torch.Tensor],
        head: dict[str, torch.Tensor],
        batch_size: int,
    ) -> None:
        """Log a ``block_parallel`` step's losses so that every block's curves come out right.

        Epoch means: every rank logs every key (collectives must match): its own value times
        the number of block groups ``k``, ``0`` for the parts it does not train. Each part is
        trained by ``r`` of the ``k r`` ranks, so the mean over ranks that Lightning takes
        once per epoch is the owners' mean, and no step communicates for them.

        Step curves: rank 0 does not hold every block, so at the batches whose step values
        Lightning writes (:meth:`at_logging_step`, the same on every rank) the same scaled
        values are averaged over the world in one small all-reduce (the owners' mean of
        this batch) and logged; other batches send nothing.
        """
        ranks = self.plan.loss_scale
        zero = torch.zeros((), device=self.device)
        terms = {
            block_loss(self.block_tag(t)): by_block[t] * ranks if t in by_block else zero
            for t in range(len(self.blocks))
        }
        for name in (LOSS_HEAD, KL):
            terms[name] = head[name].detach() * ranks if name in head else zero
        loss = total * ranks
        self.log_training(loss, terms, batch_size, step_curves=False)
        if self.at_logging_step():
            values = {"loss": loss, **terms}
            stacked = torch.stack([v.detach().float() for v in values.values()])
            (summed,) = self.runtime.sum_over_world([stacked])
            means = summed / self.trainer.world_size
            self.log_step_curves(dict(zip(values, means.unbind(), strict=True)), batch_size)

    def at_logging_step(self) -> bool:
        """Whether Lightning writes the step values of the training batch just run.

        Lightning writes them after batch ``n`` of the fit (counted from 1, over epochs and
        resumes) when ``n`` is a multiple of the trainer's ``log_every_n_steps``; ``n`` is
        the training-batch counter this module keeps for its random streams (checkpointed,
        the same on every rank), so every rank decides alike without communicating. (A
        stop requested mid-epoch makes Lightning write once more, at the last batch: that
        point repeats the last logged values.)
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and self._stream_step % every == 0
