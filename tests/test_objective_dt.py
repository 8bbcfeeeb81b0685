"""The NoProp-DT objective and the executors in plain torch: tiny ``nn.Linear`` blocks, no Trainer.

Also the shared-parameter invariant (NOPROP.md, invariant 6): when ``k`` blocks are updated on
a batch, the embedding gets the gradient of ``CE + KL + mean`` of their losses (the paper's
``E_t``), while each block gets its own loss in full.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch import nn

from noprop_lightning import NoPropModule
from noprop_lightning.execution import build_executor
from noprop_lightning.nets import ClassifierHead, LabelEmbedding
from noprop_lightning.objectives import DTBatch, DTObjective, scale_grad
from tests.helpers import TINY, tiny_batch, tiny_network, tiny_trainer

K, D, PIXELS = 4, 6, 64


class LinearBlock(nn.Module):
    """``logits = W [flatten(x), z] + b``: the smallest block an executor can run."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(PIXELS + D, K)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x.flatten(1), z], dim=1))


def tiny_objective(num_blocks: int = 3) -> tuple[nn.ModuleList, DTObjective]:
    torch.manual_seed(0)
    embedding = LabelEmbedding("learned", K, D)
    blocks = nn.ModuleList(LinearBlock() for _ in range(num_blocks))
    objective = DTObjective(
        embedding=embedding, head=ClassifierHead(embedding, K), num_blocks=num_blocks
    )
    return blocks.double(), objective.double()


def grads(params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def test_scale_grad_keeps_the_value_and_scales_the_gradient():
    w = torch.randn(5, requires_grad=True)
    out = scale_grad(w, 0.25)
    assert torch.equal(out, w)
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.full((5,), 0.25))


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("sequential", {}),
        ("threaded", {"num_threads": 2}),
        ("fused", {}),
        ("fused", {"fused_chunk_size": 2}),
    ],
)
def test_executors_drive_plain_linear_blocks_without_a_trainer(mode, options):
    """Same losses and gradients on every path, with any ``nn.Module`` blocks."""
    x, y = (t.double() if t.is_floating_point() else t for t in tiny_batch())
    results = []
    for executor in (build_executor("sequential"), build_executor(mode, **options)):
        blocks, objective = tiny_objective()
        noise, _ = objective.draw_noise(len(y), generator=torch.Generator().manual_seed(1))
        batch = DTBatch(x, y, noise.double(), shared_grad_scale=1 / 3)
        losses = executor.run(blocks, objective, batch, [0, 1, 2], torch.autograd.backward)
        results.append((losses, grads([*blocks.parameters(), objective.embedding.weight])))
    (ref_losses, ref_grads), (losses, got_grads) = results
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-14)
    for got, ref in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    assert all(g.abs().sum() > 0 for g in ref_grads)


def test_shared_grad_scale_changes_only_the_embedding_gradient():
    x, y = (t.double() if t.is_floating_point() else t for t in tiny_batch())
    seen = {}
    for scale in (1.0, 0.2):
        blocks, objective = tiny_objective(num_blocks=1)
        noise, _ = objective.draw_noise(len(y), generator=torch.Generator().manual_seed(1))
        loss = objective.block_loss(blocks[0], 0, DTBatch(x, y, noise.double(), scale))
        loss.backward()
        seen[scale] = (loss.detach(), grads(blocks.parameters()), objective.embedding.weight.grad)
    assert torch.equal(seen[1.0][0], seen[0.2][0])  # the loss value itself is unchanged
    for a, b in zip(seen[1.0][1], seen[0.2][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the block sees its loss in full
    torch.testing.assert_close(seen[0.2][2], 0.2 * seen[1.0][2], rtol=1e-12, atol=1e-15)


def test_objective_chain_with_a_perfect_predictor_reproduces_the_marginals():
    """Invariant 2 through the production inference code (:meth:`DTObjective.sample`)."""
    torch.manual_seed(0)
    embedding = LabelEmbedding("onehot", 3)
    objective = DTObjective(embedding=embedding, head=ClassifierHead(embedding, 3), num_blocks=6)
    n = 200_000
    y = torch.arange(n) % 3

    class Oracle(nn.Module):  # saturated softmax: uhat = u_y exactly
        def forward(self, x, z):
            return 1e4 * embedding.weight[y]

    states = []

    def record(t, uhat, z_prev, noise=None):
        z = original(t, uhat, z_prev, noise)
        states.append(z)
        return z

    original = objective.schedule.step
    with mock.patch.object(objective.schedule, "step", record):
        objective.sample([Oracle()] * 6, torch.zeros(n, 1), deterministic=False)
    u = embedding.weight[y]
    for t, z in enumerate(states, start=1):
        noise = (z - objective.schedule.sqrt_abar[t] * u) / objective.schedule.sqrt_one_minus_abar[
            t
        ]
        assert abs(float(noise.mean())) < 0.01
        assert abs(float(noise.var()) - 1) < 0.02


# ---------------------------------------------------------------------- through Lightning
def shared_gradient_of_one_step(block_order: str, picked=None):
    """Run one real training step (optimizer steps patched out); return the module, the
    batch, the noise and the gradients it left on the embedding and the blocks."""
    torch.manual_seed(0)
    module = NoPropModule(
        **{**TINY, "network": tiny_network(dropout=0.0)},
        num_blocks=3,
        embedding="learned",
        embed_dim=5,
        block_order=block_order,
    ).double()
    x, y = tiny_batch(n=8)
    x = x.double()
    noise = (torch.randn(3, 8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.optim.AdamW, "step"))
        stack.enter_context(mock.patch.object(NoPropModule, "draw_noise", return_value=noise))
        if picked is not None:
            stack.enter_context(
                mock.patch.object(NoPropModule, "select_blocks", return_value=picked)
            )
        tiny_trainer(max_epochs=1, limit_val_batches=0, precision="64-true").fit(module, loader)
    got = module.embedding.weight.grad.clone()
    block_grads = [grads(block.parameters()) for block in module.blocks]
    return module, (x, y), noise, got, block_grads


def per_term_gradients(module, batch, noise, block_ids):
    """Gradients w.r.t. the embedding of each block loss alone and of CE + KL."""
    module.zero_grad(set_to_none=True)
    x, y = batch
    weight = module.embedding.weight
    step = DTBatch(x, y, noise[0])
    singles = []
    for t in block_ids:
        loss = module.objective.block_loss(module.blocks[t], t, step)
        singles.append(torch.autograd.grad(loss, weight)[0])
    ce, kl = module.objective.head_losses(y, noise[1])
    return singles, torch.autograd.grad(ce + kl, weight)[0]


def test_all_step_gives_the_embedding_the_mean_of_the_block_gradients():
    """``block_order: all``: W_embed sees CE + KL + (1/T) sum_t L_t (NOPROP.md).

    Fails if the block losses reach the embedding summed (T times the paper's weight).
    """
    module, batch, noise, got, block_grads = shared_gradient_of_one_step("all")
    singles, head = per_term_gradients(module, batch, noise, [0, 1, 2])
    expected = head + torch.stack(singles).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    summed = head + torch.stack(singles).sum(0)
    assert (got - summed).abs().max() > 1e-3 * summed.abs().max()  # the test can fail
    # Each block still gets the full gradient of its own loss.
    x, y = batch
    for t, block in enumerate(module.blocks):
        module.zero_grad(set_to_none=True)
        module.objective.block_loss(block, t, DTBatch(x, y, noise[0])).backward()
        for got_g, own in zip(block_grads[t], grads(block.parameters()), strict=True):
            torch.testing.assert_close(got_g, own, rtol=1e-10, atol=1e-13)


def test_random_step_gives_the_embedding_the_full_gradient_of_its_one_block():
    module, batch, noise, got, _ = shared_gradient_of_one_step("random", picked=[1])
    (single,), head = per_term_gradients(module, batch, noise, [1])
    torch.testing.assert_close(got, head + single, rtol=1e-10, atol=1e-12)
