"""Lightning Trainer options that NoProp's manual optimization honours itself.

References are written by hand: with plain SGD (``lr = 1``, no momentum) a step moves each
parameter by minus its gradient, so the raw gradients of a run that does not move
(``lr = 1e-30``: every step rounds away) give the expected parameters of a clipped or
accumulated run.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging

from noprop_lightning import BackpropModule, NoPropModule
from noprop_lightning.errors import ConfigurationError
from tests.helpers import TINY, tiny_loader, tiny_network, tiny_trainer

EXECUTIONS = ["sequential", "threaded", "fused"]
VAL = tiny_loader(n=8, seed=1)


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def model(lr: float, mode: str = "sequential", **kwargs) -> NoPropModule:
    torch.manual_seed(0)
    return NoPropModule(
        **{**TINY, "network": tiny_network(dropout=0.0)},
        num_blocks=3,
        optimizer=sgd(lr),
        execution={"mode": mode},
        **kwargs,
    )


class GradientLog(L.Callback):
    """The gradients each optimizer is about to step with, per batch (after any clipping)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.grads.append({})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None and any(
                p is q for g in optimizer.param_groups for q in g["params"]
            ):
                self.grads[-1][name] = p.grad.detach().clone()


def raw_gradients(mode: str, batches: int) -> tuple[dict, list[dict]]:
    """Initial parameters and each batch's gradients at them (nothing moves)."""
    module, log = model(1e-30, mode), GradientLog()
    start = {k: v.detach().clone() for k, v in module.named_parameters()}
    tiny_trainer(max_steps=batches, callbacks=[log]).fit(module, tiny_loader(n=8 * batches), VAL)
    return start, log.grads


@pytest.mark.parametrize("mode", EXECUTIONS)
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_clips_each_block_on_its_own(mode, algorithm):
    start, (grads,) = raw_gradients(mode, 1)
    clip = 0.05
    module = model(1.0, mode)
    trainer = tiny_trainer(max_steps=1, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    trainer.fit(module, tiny_loader(n=8), VAL)
    groups = {f"blocks.{t}.": [] for t in range(3)} | {"objective.": []}
    for name in grads:
        next(v for k, v in groups.items() if name.startswith(k)).append(name)
    clipped_somewhere = False
    for names in groups.values():
        norm = torch.linalg.vector_norm(torch.stack([grads[n].norm() for n in names]))
        for name in names:
            g = grads[name]
            if algorithm == "norm":
                expected_grad = g * min(1.0, clip / (float(norm) + 1e-6))
            else:
                expected_grad = g.clamp(-clip, clip)
            clipped_somewhere |= not torch.equal(expected_grad, g)
            expected = start[name] - expected_grad
            torch.testing.assert_close(dict(module.named_parameters())[name], expected)
    assert clipped_somewhere, "the clip value is too large to test anything"
    assert trainer.gradient_clip_val == clip  # given back after the fit


@pytest.mark.parametrize("mode", EXECUTIONS)
def test_accumulation_steps_once_per_group_with_the_mean_gradient(mode):
    start, grads = raw_gradients(mode, 3)
    module = model(1.0, mode)
    trainer = tiny_trainer(max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(module, tiny_loader(n=24), VAL)  # 3 batches: a group of 2, then the last one
    assert trainer.global_step == 2
    # Batch 3's gradient was taken at the parameters after the first step: check the first
    # group exactly with a 2-batch epoch, and the partial group's scaling below.
    module2 = model(1.0, mode)
    tiny_trainer(max_epochs=1, accumulate_grad_batches=2).fit(module2, tiny_loader(n=16), VAL)
    for name, p in module2.named_parameters():
        expected = start[name] - (grads[0][name] + grads[1][name]) / 2
        torch.testing.assert_close(p, expected, msg=name)
    assert trainer.accumulate_grad_batches == 2  # given back after the fit


def test_the_last_partial_group_of_an_epoch_is_stepped_with_loss_over_n():
    start, (grads,) = raw_gradients("sequential", 1)
    module = model(1.0)
    trainer = tiny_trainer(max_epochs=1, accumulate_grad_batches=4)
    trainer.fit(module, tiny_loader(n=8), VAL)  # one batch, a group of 4 cut short
    assert trainer.global_step == 1
    for name, p in module.named_parameters():
        torch.testing.assert_close(p, start[name] - grads[name] / 4, msg=name)


def test_swa_is_refused_for_noprop_in_one_line():
    trainer = tiny_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=1e-3)], max_epochs=1)
    with pytest.raises(ConfigurationError, match="SWA works with BackpropModule"):
        trainer.fit(model(0.1), tiny_loader(n=16))


def test_backprop_clips_fused_adamw_under_bf16():
    module = BackpropModule(**TINY, num_blocks=2)  # paper_adamw: fused on CPU
    trainer = tiny_trainer(max_steps=2, precision="bf16-mixed", gradient_clip_val=0.5)
    trainer.fit(module, tiny_loader(n=16), VAL)
    assert trainer.global_step == 2


def test_swa_works_with_backprop_as_the_refusal_says():
    module = BackpropModule(**TINY, num_blocks=2)
    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    trainer = tiny_trainer(callbacks=[swa], max_epochs=2)
    trainer.fit(module, tiny_loader(n=16), VAL)
    assert trainer.state.finished and swa.n_averaged is not None and int(swa.n_averaged) >= 1
