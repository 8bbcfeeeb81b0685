"""Inference in eval mode, whatever mode the module is in (``predict_logits``'s wrapper)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

#: Marks a function already wrapped by :func:`in_eval_mode`.
WRAPPED = "_runs_in_eval_mode"


def in_eval_mode(predict: Callable[..., Any]) -> Callable[..., Any]:
    """``predict`` run with every submodule in eval mode, their training flags restored after.

    No dropout, and BatchNorm reads its running statistics without updating them, also for a
    module in training mode (as ``load_from_checkpoint`` and ``trainer.fit`` leave it). A
    module already wholly in eval mode (a trainer's evaluation loops, export) is left alone:
    nothing is switched, so tracing and compiling see no mode change.

    Args:
        predict: A method ``(module, *args, **kwargs)`` of an ``nn.Module``.

    Returns:
        The wrapped method (marked, so that wrapping it again changes nothing).
    """
    if getattr(predict, WRAPPED, False):
        return predict

    @functools.wraps(predict)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        modes = [(module, module.training) for module in self.modules()]
        if not any(training for _, training in modes):
            return predict(self, *args, **kwargs)
        self.eval()
        try:
            return predict(self, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    setattr(wrapper, WRAPPED, True)
    return wrapper
