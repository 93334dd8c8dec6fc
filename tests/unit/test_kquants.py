"""Q4_K and Q6_K against llama.cpp itself: the ggml library inside llama-cpp-python
quantizes the same floats (`ggml_quantize_chunk`: without an importance matrix the reference
quantizers llama-quantize runs, with one its importance-weighted ones) and our bytes must be
the same bytes."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from edgekit.formats.ggml_blocks import to_bytes
from edgekit.formats.kquants import dequantize_k, pack_k, quantize_k, regrid_k
from tests.conftest import make_tiny_llama

GGML_TYPE = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q8_0": 8, "q4_k": 12, "q6_k": 14}  # enum ggml_type


def llama_cpp_bytes(w: torch.Tensor, fmt: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """llama.cpp's own quantization of w (R, C), with an importance matrix's column weights
    `importance` (C,) when given: (R, bytes per row) uint8."""
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
    qw = None if importance is None else np.ascontiguousarray(importance.numpy(), dtype=np.float32)
    lib.ggml_quantize_chunk(GGML_TYPE[fmt], src.ctypes.data, dst.ctypes.data, 0, rows, cols,
                            None if qw is None else qw.ctypes.data)
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


def importance(cols: int, seed: int) -> torch.Tensor:
    """Column weights as an importance matrix holds them: mean squared activations, spread over
    orders of magnitude (a few outlier channels), a zero column (a channel never active)."""
    g = torch.Generator().manual_seed(100 + seed)
    qw = torch.exp(torch.randn(cols, generator=g) * 1.5) * 1e-2
    qw[3] = 0.0
    return qw


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q5_0", "q4_0", "q8_0"])
@pytest.mark.parametrize("seed", [0, 1])
def test_importance_weighted_bytes_equal_llama_cpp(fmt, seed):
    """With an importance matrix (llama-quantize --imatrix): quantize_row_*_impl, byte for byte,
    and different from the unweighted quantization (the weights are used) except Q8_0's, which
    llama.cpp does not weight."""
    from edgekit.formats.ggml_blocks import pack_exact, quantize_exact

    w, qw = weights(seed), importance(512, seed)
    ours = pack_exact(quantize_exact(w, fmt, qw)).numpy()
    assert np.array_equal(ours, llama_cpp_bytes(w, fmt, qw))
    assert np.array_equal(ours, to_bytes(w, fmt).numpy()) == (fmt == "q8_0")


def test_real_weights_equal_llama_cpp(tiny_wide_dir):
    """Trained-looking weights (a model quantized before has ties everywhere)."""
    from safetensors.torch import load_file

    w = load_file(tiny_wide_dir / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    w = (w * 0.1).half().float()
    for fmt in ("q4_k", "q6_k"):
        assert np.array_equal(to_bytes(w, fmt).numpy(), llama_cpp_bytes(w, fmt))
        qw = importance(w.shape[1], 0)
        assert np.array_equal(pack_k(quantize_k(w, fmt, qw)).numpy(), llama_cpp_bytes(w, fmt, qw))


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
    assert_same_tensors(ours, theirs)
    assert ours.stat().st_size == theirs.stat().st_size


def assert_same_tensors(ours, theirs) -> dict:
    """Two GGUF files hold the same tensors, types and bytes; returns theirs by name."""
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
    return b




@pytest.mark.parametrize("model", ["tiny_wide_dir", "tiny_teacher_dir"])
def test_importance_weighted_qat_grid_is_llama_cpp_imatrix_quantization(model, request, tmp_path):
    """QAT with `importance: imatrix` starts on llama.cpp's imatrix quantization: the importance
    measured on the model, written on the plan with it (as the export writes a QAT student), is
    llama-quantize's Q4_K_M with the same importance matrix byte for byte (Q4_K/Q6_K at width 256;
    the Q5_0/Q8_0 fallbacks of the narrow model), and the fake quantizer's forward is that grid."""
    from safetensors.torch import load_file

    from edgekit.export.gguf_write import write_gguf
    from edgekit.export.llama_quantize import quantize_gguf
    from edgekit.formats.ggml_blocks import GGML_TYPES, grid, quantize_exact, dequantize_exact
    from edgekit.models.loading import load_causal_lm
    from edgekit.quant.imatrix import collect
    from edgekit.quant.qat import learned_blocks, plan_types, prepare
    from edgekit.stages.qat import column_importance

    folder = request.getfixturevalue(model)
    model = load_causal_lm(folder)
    rows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    plan = plan_types(folder, "q4_k_m")
    importance = column_importance(model, folder, rows)
    ours = write_gguf(folder, tmp_path / "ours.gguf", "q4_k_m", types=plan,
                      blocks=learned_blocks(folder, plan, None, importance))
    theirs = quantize_gguf(write_gguf(folder, tmp_path / "F16.gguf", "f16"), tmp_path / "llama-imatrix.gguf", "q4_k_m",
                           imatrix=collect(model, folder, rows, "t").means())
    plain = {t.name: np.asarray(t.data) for t in GGUFReader(quantize_gguf(tmp_path / "F16.gguf", tmp_path / "plain.gguf",
                                                                          "q4_k_m")).tensors}
    b = assert_same_tensors(ours, theirs)
    weighted = [n for n in b if b[n].tensor_type.name not in ("F32", "F16", "Q8_0")]
    assert weighted and all(not np.array_equal(np.asarray(b[n].data), plain[n]) for n in weighted)

    key = next(k for k, t in plan.items() if t in ("Q4_K", "Q5_0") and k in importance)
    w = load_file(folder / "model.safetensors")[key].half().float()
    prepare(model, plan, refresh=1, importance=importance)
    module = model.get_submodule(key.removesuffix(".weight"))
    fmt = GGML_TYPES[plan[key]]
    assert torch.equal(module.weight.detach(), dequantize_exact(quantize_exact(w, fmt, importance[key])))
    assert not torch.equal(module.weight.detach(), grid(w, fmt))
