"""Export of the deterministic inference chain: torch.export and ONNX, parity with the module."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys

import lightning as L
import pytest
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from noprop_lightning import BackpropModule, NoPropCTModule, NoPropFMModule, NoPropModule
from noprop_lightning.errors import ConfigurationError
from noprop_lightning.export import InferenceChain, export_onnx, export_program
from tests.helpers import TINY

#: The export takes batch 2; every other size here checks that the batch stays dynamic.
BATCHES = (1, 3, 7)
EXACT = {"rtol": 0.0, "atol": 0.0}  # the same aten ops on the same CPU: bit-identical


def skip_without_onnx_exporter() -> None:
    """torch.onnx.export (its torch.export-based exporter) needs onnx and onnxscript."""
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            pytest.skip(f"{name} not installed (pip install noprop-lightning[export])")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def trained_looking(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so eval-mode capture is actually tested."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return module


def program_logits(program: ExportedProgram, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return program.module()(x)


def test_dt_program_equals_deterministic_predict_logits_for_any_batch_size():
    torch.manual_seed(0)
    module = trained_looking(NoPropModule(**TINY, num_blocks=3, inference="stochastic"))
    program = export_program(module, example_batch_size=2)
    # Images in, logits out: no label (nor noise) input.
    user_inputs = [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT
    ]
    assert user_inputs == ["images"]
    assert module.training and module.inference == "stochastic"  # both restored
    module.eval()
    for n in BATCHES:
        x = images(n, seed=n)
        expected = module.predict_logits(x, deterministic=True)
        got = program_logits(program, x)
        assert got.shape == (n, 4)
        torch.testing.assert_close(got, expected, **EXACT)
    # The stochastic chain differs: the program really is the deterministic one.
    assert not torch.equal(module.predict_logits(images(7, seed=7)), got)


def test_saved_program_loads_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(1)
    module = NoPropModule(**TINY, num_blocks=2, embedding="learned", embed_dim=5).eval()
    torch.export.save(export_program(module, example_batch_size=4), tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    x = images(5)
    torch.testing.assert_close(
        program_logits(loaded, x), module.predict_logits(x, deterministic=True), **EXACT
    )


@pytest.mark.parametrize("architecture", ["chained", "cnn"])
def test_backprop_program_equals_predict_logits(architecture):
    torch.manual_seed(2)
    module = trained_looking(BackpropModule(**TINY, num_blocks=3, architecture=architecture))
    program = export_program(module)
    module.eval()
    for n in BATCHES:
        x = images(n, seed=n)
        with torch.no_grad():
            expected = module.predict_logits(x)
        torch.testing.assert_close(program_logits(program, x), expected, **EXACT)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cls", "sampler", "steps", "extra"),
    [
        (NoPropCTModule, "heun", 3, {}),
        (NoPropFMModule, "euler", 4, {"embedding": "learned", "embed_dim": 5}),
    ],
)
def test_continuous_program_runs_the_fixed_step_sampler_from_zero(cls, sampler, steps, extra):
    torch.manual_seed(3)
    # start="noise" at runtime: the export is still the deterministic chain from z_0 = 0.
    inference = {"steps": 50, "sampler": "euler", "start": "noise"}
    module = cls(**TINY, **extra, inference=inference).eval()
    program = export_program(module, steps=steps, sampler=sampler)
    for n in BATCHES:
        x = images(n, seed=n)
        z0 = torch.zeros(n, module.embed_dim)
        expected = module.predict_logits(x, steps=steps, sampler=sampler, z0=z0)
        torch.testing.assert_close(program_logits(program, x), expected, **EXACT)
    # Default steps and sampler: the module's own inference settings.
    module.inference = {"steps": 2, "sampler": "heun", "start": "zero"}
    x = images(3)
    torch.testing.assert_close(
        program_logits(export_program(module), x), module.predict_logits(x), **EXACT
    )


def test_numba_backend_is_exported_with_the_torch_ops_and_kept():
    torch.manual_seed(4)
    execution = {"diffusion_backend": "numba"}
    module = NoPropModule(**TINY, num_blocks=2, execution=execution).eval()
    program = export_program(module)
    assert module.objective.backend == "numba"
    module.objective.use_backend("torch")
    x = images(3)
    torch.testing.assert_close(
        program_logits(program, x), module.predict_logits(x, deterministic=True), **EXACT
    )


def test_refusals_are_configuration_errors():
    module = NoPropModule(**TINY, num_blocks=2)
    with pytest.raises(ConfigurationError, match="stochastic inference .* cannot be exported"):
        export_program(module, deterministic=False)
    with pytest.raises(ConfigurationError, match="example_batch_size must be >= 2"):
        export_program(module, example_batch_size=1)
    with pytest.raises(ConfigurationError, match="NoPropModule has none"):
        export_program(module, steps=10)
    with pytest.raises(ConfigurationError, match="cannot export Linear"):
        InferenceChain(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="steps must be an integer >= 1"):
        export_program(NoPropFMModule(**TINY), steps=0)


@pytest.mark.parametrize("cls", [NoPropModule, BackpropModule, NoPropCTModule, NoPropFMModule])
def test_default_to_torchscript_points_to_the_export_module(cls):
    """TorchScript cannot compile these modules: one clear error instead of its traceback."""
    with pytest.raises(ConfigurationError, match=r"noprop_lightning\.export: export_program"):
        cls(**TINY).to_torchscript()


def test_onnx_export_without_onnxscript_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ConfigurationError, match=r"onnxscript .*noprop-lightning\[export\]"):
        export_onnx(NoPropModule(**TINY, num_blocks=2), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_onnx_export_refuses_a_folder_as_the_file(tmp_path):
    skip_without_onnx_exporter()
    with pytest.raises(ConfigurationError, match="it is a folder"):
        export_onnx(NoPropModule(**TINY, num_blocks=2), tmp_path)


@pytest.mark.parametrize("cls", [NoPropModule, NoPropFMModule])
def test_onnx_runtime_matches_the_module(cls, tmp_path):
    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime not installed (pip install noprop-lightning[export])"
    )
    skip_without_onnx_exporter()
    torch.manual_seed(5)
    extra = {"num_blocks": 3} if cls is NoPropModule else {"inference": {"steps": 3}}
    module = trained_looking(cls(**TINY, **extra)).eval()
    path = export_onnx(module, tmp_path / "sub" / "model.onnx")
    assert path == tmp_path / "sub" / "model.onnx"
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # weights inside the file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and out.name == "logits"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 8, 8]  # dynamic batch
    for n in BATCHES:
        x = images(n, seed=n)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        if cls is NoPropModule:
            expected = module.predict_logits(x, deterministic=True)
        else:
            expected = module.predict_logits(x)  # start "zero" is the default
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# Tracing is deprecated three times over: torch.jit.trace itself, Lightning's to_torchscript
# (asserted below) and torchmetrics properties the tracer reads. Use noprop_lightning.export.
@pytest.mark.filterwarnings("ignore:`torch.jit.trace(_method)?` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:This property will be removed in 2.0.0:DeprecationWarning")
def test_to_torchscript_trace_is_still_lightnings():
    """Tracing works (forward in the module's inference mode)."""
    torch.manual_seed(6)
    module = NoPropModule(**TINY, num_blocks=2, inference="deterministic").eval()
    # Lightning deprecated to_torchscript during 2.6 (2.6.0 does not warn, 2.6.6 does).
    deprecated = "deprecat" in inspect.getsource(L.LightningModule.to_torchscript).lower()
    expected = (
        pytest.warns(DeprecationWarning, match="to_torchscript")
        if deprecated
        else contextlib.nullcontext()
    )
    with expected:
        traced = module.to_torchscript(method="trace", example_inputs=images(2))
    x = images(5)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), module.predict_logits(x), **EXACT)
