"""Q4_K and Q6_K against llama.cpp itself: the ggml library inside llama-cpp-python
quantizes the same floats (`ggml_quantize_chunk`, no importance matrix: the reference
quantizers llama-quantize runs) and our bytes must be the same bytes."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from edgekit.formats.ggml_blocks import to_bytes
from edgekit.formats.kquants import dequantize_k, quantize_k, regrid_k
from tests.conftest import make_tiny_llama

GGML_TYPE = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q8_0": 8, "q4_k": 12, "q6_k": 14}  # enum ggml_type


def llama_cpp_bytes(w: torch.Tensor, fmt: str) -> np.ndarray:
    """llama.cpp's own quantization of w (R, C): (R, bytes per row) uint8."""
    import llama_cpp

    lib_path = next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    lib = ctypes.CDLL(str(lib_path))
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    src = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    rows, cols = src.shape
    row_bytes = lib.ggml_row_size(GGML_TYPE[fmt], cols)
    dst = np.zeros((rows, row_bytes), np.uint8)
    lib.ggml_quantize_chunk(GGML_TYPE[fmt], src.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    return dst


def weights(seed=0, rows=12, cols=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, 7] = 0.6  # an outlier
    w[2, :256] = w[2, :256].abs()  # all positive: min clamps to 0
    w[3, :32] = 0.01  # a constant sub-block
    w[4] = torch.round(w[4] * 100) / 100  # values on a coarse grid: ties between candidate scales
    w[5, 256:] = torch.randn(256, generator=g) * 1e-3  # a tiny-scale super-block beside a normal one
    return w


@pytest.mark.parametrize("fmt", list(GGML_TYPE))
@pytest.mark.parametrize("seed", [0, 1])
def test_bytes_equal_llama_cpp(fmt, seed):
    w = weights(seed)
    assert np.array_equal(to_bytes(w, fmt).numpy(), llama_cpp_bytes(w, fmt))


def test_real_weights_equal_llama_cpp(tiny_wide_dir):
    """Trained-looking weights (a model quantized before has ties everywhere)."""
    from safetensors.torch import load_file

    w = load_file(tiny_wide_dir / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    w = (w * 0.1).half().float()
    for fmt in ("q4_k", "q6_k"):
        assert np.array_equal(to_bytes(w, fmt).numpy(), llama_cpp_bytes(w, fmt))


@pytest.mark.parametrize("fmt,ggml", [("q4_k", T.Q4_K), ("q6_k", T.Q6_K)])
def test_dequantize_equals_gguf_reference(fmt, ggml):
    w = weights(2)
    blk = quantize_k(w, fmt)
    ref = quants.dequantize(llama_cpp_bytes(w, fmt), ggml)
    assert np.array_equal(dequantize_k(blk).numpy(), ref)


def test_k_quant_error_is_small_and_ordered():
    w = weights(3)[6:]
    err = {f: (dequantize_k(quantize_k(w, f)) - w).pow(2).mean().item() for f in ("q4_k", "q6_k")}
    assert err["q6_k"] < err["q4_k"] < 0.05 * w.pow(2).mean().item()


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_regrid_on_the_same_weights_is_the_grid_bit_for_bit(fmt):
    """QAT between two scale searches re-rounds on the last scales: for the weights those scales
    came from, that is exactly the full quantizer's grid (zeros' signs included); for moved
    weights, a point of the format on the kept scales."""
    for seed in (0, 1, 2):
        w = weights(seed)
        blk = quantize_k(w, fmt)
        assert torch.equal(regrid_k(w, blk).view(torch.int32), dequantize_k(blk).view(torch.int32))
    moved = w + 1e-3 * torch.randn_like(w)
    again = regrid_k(moved, blk)
    assert not torch.equal(again, dequantize_k(blk))
    assert torch.equal(regrid_k(again, blk), again)  # on the kept scales' grid already


def test_rows_not_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.zeros(2, 96), "q4_k")


@pytest.fixture(scope="module")
def tiny_wide_dir(tmp_path_factory, tiny_tokenizer_dir):
    # width 256: llama.cpp's Q4_K_M gives real Q4_K and Q6_K tensors (not the Q5_0 fallback)
    # init 0.1, not the narrow models' 0.3: at width 256 that would give activations in the
    # hundreds, where llama.cpp's 8-bit activation blocks (Q8_K) dominate any parity figure
    return make_tiny_llama(tmp_path_factory.mktemp("wide") / "tiny-wide", tiny_tokenizer_dir, layers=2, hidden=256,
                           init_range=0.1)


def test_planned_gguf_is_llama_cpp_quantization_byte_for_byte(tiny_wide_dir, tmp_path):
    from edgekit.export.gguf_write import write_gguf
    from edgekit.export.llama_quantize import quantize_gguf
    from edgekit.quant.qat import plan_types

    plan = plan_types(tiny_wide_dir, "q4_k_m")
    assert {"Q4_K", "Q6_K"} <= set(plan.values())
    ours = write_gguf(tiny_wide_dir, tmp_path / "ours-Q4_K_M.gguf", "q4_k_m", types=plan)
    theirs = quantize_gguf(write_gguf(tiny_wide_dir, tmp_path / "F16.gguf", "f16"), tmp_path / "llama-Q4_K_M.gguf", "q4_k_m")
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
    assert ours.stat().st_size == theirs.stat().st_size


