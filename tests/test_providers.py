"""ONNX Runtime execution providers: GPU providers chosen where ONNX Runtime offers them, the CPU
forced by BRAINSEG_ONNX_DEVICE=cpu, a clear log line either way. No GPU here: ONNX Runtime's
answers are monkeypatched, and the session it builds is checked for what it was asked."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from brainseg.inference import backends as inference
from brainseg.inference import registry
from brainseg.inference.backends import OnnxBackend, onnx_providers
from brainseg.serving.settings import Settings, StartupError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("auto", [CPU], [CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", [TRT, CUDA, CPU], [TRT, CUDA, CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("cpu", [TRT, CUDA, CPU], [CPU]),
        ("cuda", [TRT, CUDA, CPU], [CUDA, CPU]),
        ("tensorrt", [TRT, CUDA, CPU], [TRT, CUDA, CPU]),
        ("CUDA ", [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_providers_follow_what_onnx_runtime_offers(device, available, expected):
    assert onnx_providers(device, available) == expected


def test_a_gpu_asked_for_but_absent_runs_on_the_cpu_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="brainseg.inference.backends"):
        assert onnx_providers("cuda", [CPU]) == [CPU]
    assert "ONNX device cuda asked for, but ONNX Runtime offers only CPUExecutionProvider: running on the CPU" in caplog.text


def test_the_environment_chooses_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("BRAINSEG_ONNX_DEVICE", "cpu")
    assert onnx_providers(None, [CUDA, CPU]) == [CPU]
    monkeypatch.setenv("BRAINSEG_ONNX_DEVICE", "gpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda, tensorrt"):
        onnx_providers(None, [CPU])
    with pytest.raises(StartupError, match="BRAINSEG_ONNX_DEVICE"):
        Settings.from_env({"BRAINSEG_ONNX_DEVICE": "gpu"})
    assert Settings.from_env({"BRAINSEG_ONNX_DEVICE": "cpu"}).onnx_device == "cpu"


@pytest.fixture
def onnx_file(tiny_model_dir):
    reg = registry.read(tiny_model_dir)
    return reg.file(reg.default, "onnx")


@pytest.fixture
def sessions(monkeypatch):
    """Records the providers each InferenceSession is asked for (the real session is still built)."""
    asked = []
    real = ort.InferenceSession

    def recording(path, sess_options=None, providers=None, **kw):
        asked.append(list(providers))
        return real(path, sess_options=sess_options, providers=[p for p in providers if p in real_available], **kw)

    real_available = ort.get_available_providers()
    monkeypatch.setattr(ort, "InferenceSession", recording)
    return asked


def test_a_session_on_a_machine_with_cuda_asks_for_it_and_logs_its_providers(onnx_file, sessions, monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with caplog.at_level(logging.INFO, logger="brainseg.inference.backends"):
        backend = OnnxBackend(onnx_file, threads=1)
    assert sessions == [[CUDA, CPU]]
    # This machine has no GPU: the real session runs on the CPU, and the log says it fell back.
    assert backend.providers == [CPU]
    assert f"ONNX Runtime could not start CUDAExecutionProvider for {onnx_file.name}; running on CPUExecutionProvider" in caplog.text
    assert f"ONNX Runtime session for {onnx_file.name} on CPUExecutionProvider" in caplog.text


def test_forcing_the_cpu_never_asks_for_a_gpu(onnx_file, sessions, monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setenv("BRAINSEG_ONNX_DEVICE", "cpu")
    with caplog.at_level(logging.INFO, logger="brainseg.inference.backends"):
        backend = OnnxBackend(onnx_file, threads=1)
    assert sessions == [[CPU]] and backend.providers == [CPU]
    assert "could not start" not in caplog.text


def test_the_service_setting_reaches_the_session(tiny_model_dir, sessions, monkeypatch):
    """BRAINSEG_ONNX_DEVICE (Settings.onnx_device) is what the engine's sessions are built with."""
    from brainseg.serving.engine import Engine

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    Engine(Settings.from_env({}, model_dir=str(tiny_model_dir), backend="onnx", onnx_device="cpu")).get()
    Engine(Settings.from_env({}, model_dir=str(tiny_model_dir), backend="onnx")).get()
    assert sessions == [[CPU], [CUDA, CPU]]
    assert inference.GPU_PROVIDERS["cuda"] == [CUDA]
