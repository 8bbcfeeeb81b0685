"""Execution paths (sequential, threaded, fused) give the same numbers as sequential.

Tolerances: the equality tests run in float64 (Lightning ``precision="64-true"``) with
``rtol=1e-9, atol=1e-12``; for gradients ``atol`` is 1e-12 times the largest reference
gradient entry (see :func:`assert_same_grads`), and parameters after AdamW steps use
``atol=1e-6`` (see the multi-step test). In float64 the paths differ only by the order of
floating-point sums (grouped convolutions, batched matmuls), about 1e-15 relative. A float32
test uses ``rtol=1e-4, atol=1e-6`` (one SGD step). The equality tests over every path use
``dropout=0``: the fused path draws dropout masks from a different random stream
(``vmap(randomness="different")``). The threaded path draws each block's masks from the
block's own generator, and equals the sequential path with dropout on, bit for bit (the
dropout tests at the end).
"""

from __future__ import annotations

import copy
import os
import threading
import time
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch

from noprop_lightning import NoPropModule
from noprop_lightning.cli import main
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.execution import (
    EXECUTORS,
    BlockExecutionError,
    FusedExecutor,
    ThreadedExecutor,
    build_executor,
)
from noprop_lightning.objectives import DTBatch
from tests.helpers import (
    TINY,
    TINY_NOPROP,
    assert_same,
    ddp_args,
    run_cli,
    tiny_batch,
    tiny_loader,
    tiny_network,
    tiny_trainer,
)

RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One torch thread: on a shared, loaded 2-core machine OpenMP barriers of tiny ops cost
    milliseconds each (measured: these tests run ~20x faster). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: (execution, extra hyper-parameters) for every non-reference path.
PATHS = [
    ("threaded", {"num_threads": 2}),
    ("threaded", {}),
    ("fused", {}),
    ("fused", {"fused_chunk_size": 2}),
]
PATH_IDS = ["threaded-2", "threaded-default", "fused-all", "fused-chunk2"]


def make(**kwargs) -> NoPropModule:
    params = {**TINY, "num_blocks": 3, "network": tiny_network(dropout=0.0), **kwargs}
    return NoPropModule(**params)


def settings(mode: str, options: dict) -> dict:
    """The ``execution`` settings of a module for ``build_executor``-style options."""
    renamed = {"fused_chunk_size": "chunk_size"}
    return {"mode": mode, **{renamed.get(k, k): v for k, v in options.items()}}


def run_once(module: NoPropModule, executor, x, y, noise, block_ids=None, backward=True):
    """One executor call on the module's blocks and objective, without a Trainer."""
    block_ids = list(range(module.num_blocks)) if block_ids is None else block_ids
    batch = DTBatch(x, y, noise)
    return executor.run(
        module.blocks,
        module.objective,
        batch,
        block_ids,
        torch.autograd.backward if backward else None,
    )


def assert_same_grads(module: NoPropModule, reference: NoPropModule, rtol=RTOL, atol=ATOL):
    """Compare gradients; ``atol`` is relative to the largest reference gradient entry.

    Some gradients are exactly zero in exact arithmetic (a bias followed by BatchNorm) and
    pure rounding noise in floating point, of the size of the largest terms times epsilon.
    """
    grads = [q.grad.abs().max() for q in reference.parameters() if q.grad is not None]
    scale = max(1.0, float(torch.stack(grads).max()))
    pairs = zip(module.named_parameters(), reference.named_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol * scale, msg=name)


def assert_same_state(module: NoPropModule, reference: NoPropModule, rtol=RTOL, atol=ATOL):
    state, ref_state = module.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(("execution", "options"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("embedding", ["onehot", "learned", "prototype"])
def test_one_update_matches_sequential(execution, options, embedding):
    """Same losses, gradients (blocks and embedding) and BatchNorm statistics as sequential."""
    torch.manual_seed(0)
    reference = make(embedding=embedding, num_blocks=4).double()
    x, y = tiny_batch()
    x = x.double()
    noise = torch.randn(4, len(y), reference.embed_dim, dtype=torch.float64)
    module = copy.deepcopy(reference)
    module.executor = build_executor(execution, **options)

    ref_losses = run_once(reference, reference.executor, x, y, noise)
    losses = run_once(module, module.executor, x, y, noise)

    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_grads(module, reference)
    assert_same_state(module, reference)  # running_mean / running_var / num_batches_tracked
    # The comparison can fail: the reference did change the BatchNorm statistics.
    assert reference.blocks[0].fuse[1].running_mean.abs().sum() > 0


@pytest.mark.parametrize(("execution", "options"), PATHS, ids=PATH_IDS)
def test_single_backward_mode_returns_attached_losses(execution, options):
    """``backward=False`` (DDP): attached losses whose summed backward gives the same grads."""
    torch.manual_seed(0)
    reference = make(embedding="learned").double()
    x, y = tiny_batch()
    x = x.double()
    noise = torch.randn(3, len(y), reference.embed_dim, dtype=torch.float64)
    module = copy.deepcopy(reference)
    executor = build_executor(execution, **options)

    ref_losses = run_once(reference, reference.executor, x, y, noise)
    losses = run_once(module, executor, x, y, noise, backward=False)
    assert losses.requires_grad and losses.shape == (3,)
    assert all(p.grad is None for p in module.parameters())
    losses.sum().backward()
    torch.testing.assert_close(losses.detach(), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_grads(module, reference)


@pytest.mark.parametrize(("execution", "options"), PATHS, ids=PATH_IDS)
def test_subset_of_blocks_in_any_order(execution, options):
    """Non-contiguous block subsets (random block order) touch only those blocks."""
    torch.manual_seed(0)
    reference = make(num_blocks=4).double()
    x, y = tiny_batch()
    x = x.double()
    noise = torch.randn(4, len(y), reference.embed_dim, dtype=torch.float64)
    module = copy.deepcopy(reference)
    executor = build_executor(execution, **options)
    ref_losses = run_once(reference, reference.executor, x, y, noise, block_ids=[3, 1])
    losses = run_once(module, executor, x, y, noise, block_ids=[3, 1])
    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_grads(module, reference)
    assert all(p.grad is None for t in (0, 2) for p in module.blocks[t].parameters())


class Snapshots(L.Callback):
    """Copies of the module's state after every training batch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def train(module: NoPropModule, steps: int, **trainer_kwargs) -> list[dict[str, torch.Tensor]]:
    """Fit ``steps`` batches; return the state after each step."""
    snapshots = Snapshots()
    torch.manual_seed(123)  # the same noise draws for every path
    trainer = tiny_trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        callbacks=[snapshots],
        **trainer_kwargs,
    )
    trainer.fit(module, tiny_loader(n=64, batch_size=16))
    return snapshots.states


def assert_same_states(states, ref_states, rtol, atol):
    assert len(states) == len(ref_states)
    for step, (state, ref_state) in enumerate(zip(states, ref_states, strict=True), start=1):
        assert state.keys() == ref_state.keys()
        for name, value in ref_state.items():
            torch.testing.assert_close(
                state[name], value, rtol=rtol, atol=atol, msg=f"step {step}: {name}"
            )


TRAINER_PATHS = [PATHS[0], PATHS[2], PATHS[3]]
TRAINER_IDS = [PATH_IDS[0], PATH_IDS[2], PATH_IDS[3]]


@pytest.mark.parametrize(("execution", "options"), TRAINER_PATHS, ids=TRAINER_IDS)
@pytest.mark.parametrize(
    ("optimizer", "atol"),
    [
        (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), ATOL),
        (None, 1e-6),
    ],
    ids=["sgd", "adamw"],
)
def test_parameters_after_one_and_several_steps_match_sequential(
    execution, options, optimizer, atol
):
    """Through Lightning (manual optimisation, one optimizer per block), float64, 3 steps.

    Parameters and buffers are compared after step 1, 2 and 3. With AdamW (the paper's
    optimizer) ``atol`` is 1e-6, a thousandth of one step (``lr=1e-3``): Adam divides by
    ``sqrt(v) + eps``, which turns the rounding noise of gradients that are zero in exact
    arithmetic (a bias followed by BatchNorm, about 1e-13) into updates of
    ``lr * 1e-13 / eps``, about 1e-8. SGD keeps the tight ``atol=1e-12``.
    """
    opt = {} if optimizer is None else {"optimizer": optimizer}
    torch.manual_seed(0)
    reference = train(make(embedding="learned", **opt), 3, precision="64-true")
    torch.manual_seed(0)
    module = make(embedding="learned", execution=settings(execution, options), **opt)
    states = train(module, 3, precision="64-true")
    assert_same_states(states, reference, rtol=RTOL, atol=atol)
    # ... and the comparison can fail: every step moved the parameters by more than atol.
    name = "blocks.0.fuse.0.weight"
    for before, after in zip(reference, reference[1:], strict=False):
        assert (after[name] - before[name]).abs().max() > 1000 * atol


@pytest.mark.parametrize(("execution", "options"), [PATHS[0], PATHS[2]], ids=PATH_IDS[::2])
def test_float32_step_matches_sequential_to_rounding(execution, options):
    """float32, one SGD step: ``rtol=1e-4, atol=1e-6``."""
    sgd = {"optimizer": lambda params: torch.optim.SGD(params, lr=0.1)}
    torch.manual_seed(0)
    reference = train(make(embedding="learned", **sgd), 1)
    torch.manual_seed(0)
    states = train(make(embedding="learned", execution=settings(execution, options), **sgd), 1)
    assert_same_states(states, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("execution", ["threaded", "fused"])
def test_training_with_random_block_order_matches_sequential(execution):
    sgd = {"optimizer": lambda params: torch.optim.SGD(params, lr=0.1)}
    torch.manual_seed(0)
    reference = train(make(block_order="random", num_blocks=4, **sgd), 3, precision="64-true")
    torch.manual_seed(0)
    module = make(block_order="random", num_blocks=4, execution={"mode": execution}, **sgd)
    states = train(module, 3, precision="64-true")
    assert_same_states(states, reference, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ threaded specifics
def instrument(module: NoPropModule, delay: float, fail_block: int | None = None):
    """Make each block sleep ``delay`` s in forward and record (start, end) per block."""
    intervals: dict[int, tuple[float, float]] = {}
    lock = threading.Lock()
    for t, block in enumerate(module.blocks):
        original = block.forward

        def forward(x, z, _t=t, _original=original):
            start = time.perf_counter()
            if _t == fail_block:
                raise RuntimeError("synthetic failure")
            time.sleep(delay)  # releases the GIL, like a long torch operator
            out = _original(x, z)
            with lock:
                intervals[_t] = (start, time.perf_counter())
            return out

        block.forward = forward
    return intervals


def test_threaded_blocks_overlap_in_time():
    torch.manual_seed(0)
    module = make(num_blocks=3)
    x, y = tiny_batch()
    noise = torch.randn(3, len(y), module.embed_dim)
    intervals = instrument(module, delay=0.3)
    run_once(module, ThreadedExecutor(num_threads=3), x, y, noise)
    starts = [s for s, _ in intervals.values()]
    ends = [e for _, e in intervals.values()]
    assert len(intervals) == 3
    assert max(starts) < min(ends), f"no common overlap: {intervals}"


def test_sequential_blocks_do_not_overlap():
    """Control for the overlap test: the same instrumentation sees no overlap sequentially."""
    torch.manual_seed(0)
    module = make(num_blocks=3)
    x, y = tiny_batch()
    noise = torch.randn(3, len(y), module.embed_dim)
    intervals = instrument(module, delay=0.05)
    run_once(module, build_executor("sequential"), x, y, noise)
    ordered = [intervals[t] for t in range(3)]
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:], strict=False))


def test_threaded_worker_exception_names_the_block():
    torch.manual_seed(0)
    module = make(num_blocks=3)
    x, y = tiny_batch()
    noise = torch.randn(3, len(y), module.embed_dim)
    instrument(module, delay=0.0, fail_block=1)
    with pytest.raises(BlockExecutionError, match=r"block 2 \(of 3\).*synthetic failure") as info:
        run_once(module, ThreadedExecutor(num_threads=2), x, y, noise)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_threaded_worker_user_error_stays_a_configuration_error():
    torch.manual_seed(0)
    module = make(num_blocks=2)
    x, y = tiny_batch()
    noise = torch.randn(2, len(y), module.embed_dim)

    def bad(*args, **kwargs):
        raise ConfigurationError("bad setting")

    module.blocks[1].forward = bad
    with pytest.raises(ConfigurationError, match="block 2.*bad setting"):
        run_once(module, ThreadedExecutor(), x, y, noise)


def test_threaded_workers_inherit_grad_mode_and_autocast():
    torch.manual_seed(0)
    module = make(num_blocks=2)
    x, y = tiny_batch()
    noise = torch.randn(2, len(y), module.embed_dim)
    seen = []
    original = module.blocks[0].forward

    def forward(x, z):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return original(x, z)

    module.blocks[0].forward = forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_once(module, ThreadedExecutor(), x, y, noise, backward=False)
    with torch.no_grad():
        run_once(module, ThreadedExecutor(), x, y, noise, backward=False)
    assert seen == [(True, True), (False, False)]


def test_threaded_executor_survives_deepcopy_and_pickle():
    import pickle

    module = make(execution={"mode": "threaded", "num_threads": 2})
    x, y = tiny_batch()
    noise = torch.randn(3, len(y), module.embed_dim)
    run_once(module, module.executor, x, y, noise)  # starts the pool
    clone = copy.deepcopy(module)
    restored = pickle.loads(pickle.dumps(module.executor))
    assert clone.executor.num_threads == restored.num_threads == 2
    run_once(clone, clone.executor, x, y, noise)


# ------------------------------------------------------------------ fused specifics
def test_fused_refuses_blocks_of_different_architectures():
    module = make(num_blocks=2).double()
    module.blocks[1].fuse[0] = torch.nn.Linear(32, 8).double()  # different shape
    x, y = tiny_batch()
    noise = torch.randn(2, len(y), module.embed_dim, dtype=torch.float64)
    with pytest.raises(ConfigurationError, match="block 2 differs from block 1"):
        run_once(module, FusedExecutor(), x.double(), y, noise)


def test_fused_chunks():
    assert FusedExecutor(2).chunks([0, 1, 2, 3, 4]) == [[0, 1], [2, 3], [4]]
    assert FusedExecutor().chunks([0, 1, 2]) == [[0, 1, 2]]


def test_fused_vmaps_blocks_into_one_call_per_chunk():
    """The fused path really is batched: one functional_call per chunk, not per block."""
    from noprop_lightning.execution import fused

    torch.manual_seed(0)
    module = make(num_blocks=4)
    x, y = tiny_batch()
    noise = torch.randn(4, len(y), module.embed_dim)
    with mock.patch.object(fused, "functional_call", wraps=fused.functional_call) as call:
        run_once(module, FusedExecutor(2), x, y, noise)
    assert call.call_count == 2


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "threaded", "num_threads": 0},
        {"mode": "threaded", "num_threads": 1.5},
        {"mode": "fused", "chunk_size": 0},
        {"mode": "sequential", "num_threads": 2},
        {"mode": "sequential", "chunk_size": 2},
        {"mode": "fused", "num_threads": 2},
        {"mode": "parallel"},
        {"mode": "sequential", "diffusion_backend": "cuda"},
        {"mode": "sequential", "threads": 2},
    ],
)
def test_bad_execution_options_raise_clear_errors(kwargs):
    with pytest.raises(ConfigurationError):
        make(execution=kwargs)


def test_registry_lists_every_path():
    assert set(EXECUTORS) == {"sequential", "threaded", "fused"}
    assert build_executor("threaded", num_threads=3).num_threads == 3
    assert build_executor("fused", fused_chunk_size=4).chunk_size == 4


QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
SMALL = [
    "--model.init_args.num_blocks=3",
    "--model.init_args.network.channels=[4, 4, 4]",
    "--model.init_args.network.hidden=16",
    "--trainer.accelerator=cpu",
    "--trainer.fast_dev_run=true",
    "--test_after_fit=false",
]


def test_execution_and_backend_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippet = tmp_path / "fused_numba.yaml"
    snippet.write_text(
        "model:\n  init_args:\n    execution:\n      mode: fused\n      chunk_size: 2\n"
        "      diffusion_backend: numba\n"
    )
    cli = main(["fit", "--config", str(QUICKSTART), "--config", str(snippet), *SMALL])
    assert cli.trainer.state.finished and cli.trainer.global_step > 0
    assert isinstance(cli.model.executor, FusedExecutor)
    assert cli.model.executor.chunk_size == 2
    assert cli.model.objective.backend == "numba"


def test_execution_and_backend_from_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = [
        "--model.init_args.execution.mode=threaded",
        "--model.init_args.execution.num_threads=2",
        "--model.init_args.execution.diffusion_backend=torch",
    ]
    cli = main(["fit", "--config", str(QUICKSTART), *SMALL, *flags])
    assert cli.trainer.state.finished and cli.trainer.global_step > 0
    assert isinstance(cli.model.executor, ThreadedExecutor)
    assert cli.model.executor.num_threads == 2
    assert cli.model.objective.backend == "torch"


def test_command_line_rejects_unknown_execution(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(QUICKSTART), *SMALL, "--model.init_args.execution.mode=gpu"])
    assert exc.value.code != 0
    error = capsys.readouterr().err
    assert "execution.mode" in error and "gpu" in error
    assert "sequential" in error and "threaded" in error and "fused" in error


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("NOPROP_DDP_TESTS") != "1",
    reason="spawns 2 DDP processes per path (~30 s each on 2 cores); run with NOPROP_DDP_TESTS=1",
)
@pytest.mark.parametrize(
    "extra",
    [
        ["--model.init_args.execution.mode=threaded", "--model.init_args.execution.num_threads=2"],
        [
            "--model.init_args.execution.mode=fused",
            "--model.init_args.execution.chunk_size=2",
            "--model.init_args.execution.diffusion_backend=numba",
            "--model.init_args.embedding=learned",
        ],
    ],
    ids=["threaded", "fused-numba"],
)
def test_ddp_ranks_stay_in_sync_on_every_path(extra, tmp_path):
    """``backward=False`` under real DDP (2 CPU processes, gloo): ranks see different data
    but identical all-reduced gradients, parameters and optimizer states."""
    result = run_cli([*ddp_args(tmp_path / "dump"), *TINY_NOPROP, *extra], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["first_labels"] != r1["first_labels"]
    assert r0["first_grads"], "no gradient recorded"
    assert_same(r0["first_grads"], r1["first_grads"], "grads")
    assert_same(r0["params"], r1["params"], "params")
    assert_same(r0["optimizers"], r1["optimizers"], "optimizers")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("execution", "options"), PATHS, ids=PATH_IDS)
def test_cuda_paths_match_sequential(execution, options):
    torch.manual_seed(0)
    reference = make(embedding="learned").double().cuda()
    x, y = tiny_batch()
    x, y = x.double().cuda(), y.cuda()
    noise = torch.randn(3, len(y), reference.embed_dim, dtype=torch.float64, device="cuda")
    module = copy.deepcopy(reference)
    executor = build_executor(execution, **options)
    ref_losses = run_once(reference, reference.executor, x, y, noise)
    losses = run_once(module, executor, x, y, noise)
    torch.cuda.synchronize()
    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_grads(module, reference)


# ---------------------------------------------------------------------- dropout streams
def test_threaded_dropout_masks_are_each_blocks_own_and_match_sequential():
    """With dropout > 0, worker threads draw each block's masks from its own generator: the
    threaded path equals the sequential one bit for bit, whatever order the threads run."""
    from noprop_lightning.objectives import BlockStreams

    torch.manual_seed(0)
    reference = make(num_blocks=4, network=tiny_network(dropout=0.3)).double()
    x, y = tiny_batch()
    x = x.double()
    noise = torch.randn(4, len(y), reference.embed_dim, dtype=torch.float64)
    results = []
    for mode in ("sequential", "threaded", "threaded"):
        module = copy.deepcopy(reference)
        batch = DTBatch(x, y, noise, streams=BlockStreams(seed=7, step=3))
        losses = build_executor(mode).run(
            module.blocks, module.objective, batch, range(4), torch.autograd.backward
        )
        results.append((losses, [p.grad for p in module.parameters() if p.grad is not None]))
    (ref_losses, ref_grads), *others = results
    for losses, grads in others:
        assert torch.equal(losses, ref_losses)
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
    # The masks matter: without dropout the losses differ.
    plain = copy.deepcopy(reference).eval()
    assert not torch.equal(run_once(plain, plain.executor, x, y, noise), ref_losses)


def fitted_states(tmp_path, modes, accelerator: str = "cpu") -> list[dict]:
    """The final state_dicts of same-seed fits with dropout and a learned embedding."""
    states = []
    for mode in modes:
        L.seed_everything(3, verbose=False)
        network = tiny_network(dropout=0.3)
        module = make(network=network, embedding="learned", execution={"mode": mode})
        trainer = tiny_trainer(tmp_path, max_epochs=2, accelerator=accelerator)
        trainer.fit(module, tiny_loader(n=32), tiny_loader(8, seed=1))
        states.append({k: v.cpu() for k, v in module.state_dict().items()})
    return states


def test_two_threaded_fits_with_dropout_give_the_same_weights(tmp_path):
    """Dropout and a learned embedding (whose gradient each block adds to): two threaded fits
    and a sequential one end bit for bit equal (the embedding's contributions are summed in
    block order, not in the order the threads finish)."""
    states = fitted_states(tmp_path, ("threaded", "threaded", "sequential"))
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
    L.seed_everything(3, verbose=False)
    start = make(network=tiny_network(dropout=0.3), embedding="learned")
    key = "objective.embedding._weight"  # the embedding was trained
    assert not torch.equal(states[0][key], start.state_dict()[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_threaded_fit_with_learned_embedding_equals_sequential(tmp_path, monkeypatch):
    """On a GPU (worker CUDA streams), deterministic cuDNN: threaded = sequential, bit for bit."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    states = fitted_states(tmp_path, ("threaded", "sequential"), accelerator="gpu")
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
