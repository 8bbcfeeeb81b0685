"""One batch's gradient of a learned shared part, summed in one canonical order.

With a learned label embedding, a NoProp-DT batch's embedding gradient is a sum of ``T + 1``
contributions: the head's ``CE + KL`` and each updated block's share of the mean denoising
loss. Floating-point addition is not associative, so the bits of the sum depend on its
order. Left to autograd, the order would be whatever order the backward passes ran in
(worker threads race; each ``block_parallel`` rank sums its own blocks, then the ranks'
sums are added), and the same training would give other numbers on every layout.

:class:`SharedGradients` fixes the order: each block's contribution goes to a leaf of its
own (:meth:`~noprop_lightning.objectives.dt.DTBatch.shared_weight`), and
:meth:`SharedGradients.finish` adds them to the head's in block order,
``((head + block 1) + block 2) + ...``, then to what earlier batches of an
``accumulate_grad_batches`` group left. Across ``block_parallel`` ranks every contribution
travels in a slot of its own (one flat all-reduce, each slot written by one rank per
replica), and every rank adds the slots in that same order: one process, threads and any
split of the blocks over ranks give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from noprop_lightning.distributed.plan import TrainingPlan
from noprop_lightning.distributed.runtime import Runtime


class SharedGradients:
    """Collects one batch's shared-part gradient and sums it in canonical order.

    Create it before the batch's first backward (it sets the parameters' gradients aside),
    hand :attr:`leaves` to the batch (``DTBatch(shared_leaves=...)``), run the backward
    passes, then call :meth:`finish`.

    Args:
        params: The shared parameters this process steps (head, then embedding).
        embedding: The learned embedding matrix (one of ``params``): the parameter whose
            block contributions arrive through :attr:`leaves`.
        num_blocks: ``T``: the number of contribution slots besides the head's.
    """

    def __init__(
        self, params: Sequence[nn.Parameter], embedding: nn.Parameter, num_blocks: int
    ) -> None:
        self.params = list(params)
        if not any(p is embedding for p in self.params):
            raise ValueError("the embedding must be one of the shared parameters")
        self.embedding = embedding
        self.num_blocks = num_blocks
        #: Block index -> the leaf standing for the embedding in that block's loss.
        self.leaves: dict[int, torch.Tensor] = {}
        self._earlier = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def finish(self, plan: TrainingPlan, runtime: Runtime) -> None:
        """Sum the batch's contributions (over ranks, if the plan says so) into ``.grad``.

        Args:
            plan: The fit's plan: with ``shared_over_world`` the contributions are summed
                over every rank (slot by slot), then divided by the number of replicas.
            runtime: The run's collectives (the sum over ranks).
        """
        head = [p.grad for p in self.params]  # the head losses' part (None: no head here)
        blocks = {t: leaf.grad for t, leaf in self.leaves.items() if leaf.grad is not None}
        if plan.shared_over_world:
            head, blocks = self._sum_over_ranks(head, blocks, runtime)
        for i, p in enumerate(self.params):
            total = head[i]
            if p is self.embedding:
                for t in sorted(blocks):
                    total = blocks[t] if total is None else total + blocks[t]
            if total is not None and plan.shared_over_world and plan.replicas > 1:
                total = total * (1.0 / plan.replicas)
            earlier = self._earlier[i]
            if earlier is not None and total is not None:
                total = earlier.add_(total)
            p.grad = total if total is not None else earlier

    def _sum_over_ranks(
        self, head: list[torch.Tensor | None], blocks: dict[int, torch.Tensor], runtime: Runtime
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Every rank's contributions, each in its own slot, in one flat all-reduce."""
        parts = [
            g if g is not None else torch.zeros_like(p)
            for p, g in zip(self.params, head, strict=True)
        ]
        zero = torch.zeros_like(self.embedding)
        parts += [blocks.get(t, zero) for t in range(self.num_blocks)]
        out = runtime.sum_over_world(parts)
        # Slots nobody wrote are zeros: adding them is exact (x + 0 == x).
        return out[: len(self.params)], dict(enumerate(out[len(self.params) :]))
