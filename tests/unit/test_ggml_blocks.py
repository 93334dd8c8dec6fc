"""Our block quantizers against llama.cpp's (through the gguf package's reference port)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from edgekit.formats.ggml_blocks import dequantize, fake_quantize, pack, quantize, roundf

FORMATS = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q5_0": T.Q5_0, "q4_1": T.Q4_1}


def weights(seed=0, rows=8, cols=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block: scale 0
    w[1, 5] = 0.3  # an outlier
    w[2, :32] = torch.linspace(-1, 1, 32)  # ties between +max and -max magnitudes
    return w


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_bytes_equal_llama_cpp_reference(fmt, seed):
    w = weights(seed)
    ours = pack(quantize(w, fmt)).numpy()
    ref = quants.quantize(w.numpy(), FORMATS[fmt])
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequantize_equals_llama_cpp_reference(fmt):
    w = weights(3)
    ref = quants.dequantize(quants.quantize(w.numpy(), FORMATS[fmt]), FORMATS[fmt])
    assert np.array_equal(dequantize(quantize(w, fmt)).numpy(), ref)


def test_roundf_rounds_halves_away_from_zero():
    assert roundf(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5])).tolist() == [1, 2, 3, -1, -3]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fake_quantize_is_on_grid_and_straight_through(fmt):
    w = weights(4).requires_grad_()
    fq = fake_quantize(w, fmt)
    assert torch.equal(fake_quantize(fq.detach(), fmt), fq.detach()) or fmt == "q4_1"  # grid is (nearly) a fixed point
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_error_shrinks_with_bits():
    w = weights(5)
    err = {f: (dequantize(quantize(w, f)) - w).pow(2).mean().item() for f in ("q4_0", "q5_0", "q8_0")}
    assert err["q8_0"] < err["q5_0"] < err["q4_0"]
