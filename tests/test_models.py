"""One parametrised test over every registered network (as smp's BaseModelTester)."""

import pytest
import torch

from brainseg.config import ModelConfig
from brainseg.models import MODELS, build_model, count_parameters

SMALL = (4, 8, 16, 32)


@pytest.fixture(params=sorted(MODELS))
def name(request):
    return request.param


@pytest.mark.parametrize("size", [(64, 64), (37, 45), (33, 128)])
def test_forward_backward_any_size(name, size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, features=SMALL))
    x = torch.randn(2, 3, *size, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 1, *size)  # logits at the input's size (padded then cropped)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_eval_returns_logits_tensor(name):
    model = build_model(ModelConfig(name=name, features=SMALL, deep_supervision=True)).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 32, 32))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 1, 32, 32)
    # A sigmoid inside forward would bound the output to [0, 1]; a large bias exposes it.
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1 and m.kernel_size == (1, 1) and m.bias is not None:
            torch.nn.init.constant_(m.bias, 5.0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).max() > 1.0


def test_deep_supervision_heads():
    model = build_model(ModelConfig(name="unetpp", features=SMALL, deep_supervision=True))
    heads = model.forward_heads(torch.randn(1, 3, 32, 32))
    assert len(heads) == len(SMALL) - 1  # one per X^{0,j}, j >= 1
    assert all(h.shape == (1, 1, 32, 32) for h in heads)
    flat = build_model(ModelConfig(name="unetpp", features=SMALL))
    assert len(flat.forward_heads(torch.randn(1, 3, 32, 32))) == 1


def test_nested_nodes_named_after_the_paper():
    model = build_model(ModelConfig(name="unetpp", features=SMALL))
    names = set(model.blocks.keys())
    assert {"conv_0_0", "conv_1_0", "conv_0_3", "conv_1_2", "conv_2_1", "conv_3_0"} <= names
    assert "conv_1_3" not in names  # X^{i,j} exists only for i + j < levels


def test_attention_gates_present():
    model = build_model(ModelConfig(name="attention_unet", features=SMALL))
    assert len(model.gates) == len(SMALL) - 1


@pytest.mark.parametrize("name, expected", [("unetpp", 2291969), ("attention_unet", 2182909)])
def test_parameter_count_of_default_configuration(name, expected):
    """Widths 16-256, 3 input channels, 1 output: the configuration the shipped models use."""
    assert count_parameters(build_model(ModelConfig(name=name))) == expected


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model(ModelConfig(name="segformer"))


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_onnx_and_pytorch_give_the_same_probabilities(tiny_model_dir, model_name):
    """The exported ONNX file and its checkpoint agree on probabilities (not only masks) on random inputs."""
    import numpy as np

    from brainseg.inference.backends import OnnxBackend, Segmenter, TorchBackend

    onnx_seg = Segmenter(OnnxBackend(tiny_model_dir / f"{model_name}.onnx", threads=1), model_name)
    torch_seg = Segmenter(TorchBackend(tiny_model_dir / f"{model_name}.pt", device="cpu"), model_name)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(256, 256), (64, 64), (300, 200)]]
    images.append(rng.normal(500, 200, (128, 128, 3)).astype(np.float32))  # non-uint8: windowed first
    for tta in (False, True):
        a, b = onnx_seg.probabilities(images, tta=tta), torch_seg.probabilities(images, tta=tta)
        for pa, pb in zip(a, b, strict=False):
            assert pa.shape == pb.shape
            assert float(np.abs(pa - pb).max()) < 1e-4
        assert max(float(p.max() - p.min()) for p in a) > 0.01  # not a constant output, so agreement means something
