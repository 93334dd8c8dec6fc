"""llama.cpp's activation rounding: our PyTorch version against ggml's own quantized matmul
(the CPU library llama-cpp-python ships, called through ctypes)."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.quant.act_rounding import llama_cpp_activations, round_activations
from edgekit.formats.ggml_blocks import GGML_TYPES, grid, to_bytes

GGML_TYPE_IDS = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@pytest.fixture(scope="module")
def ggml():
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    vp = ctypes.c_void_p
    for fn, res, args in [("ggml_init", vp, [_InitParams]), ("ggml_new_tensor_2d", vp, [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
                          ("ggml_get_data", vp, [vp]), ("ggml_nbytes", ctypes.c_size_t, [vp]), ("ggml_mul_mat", vp, [vp, vp, vp]),
                          ("ggml_new_graph", vp, [vp]), ("ggml_build_forward_expand", None, [vp, vp]), ("ggml_free", None, [vp])]:
        getattr(base, fn).restype, getattr(base, fn).argtypes = res, args
    cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
    cpu.ggml_cpu_init()

    def matmul(w_bytes: np.ndarray, type_name: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
        """x (T, cols) float32 @ W.T, W (rows, cols) given as GGUF block bytes: ggml's own kernel."""
        ctx = base.ggml_init(_InitParams(64 << 20, None, False))
        try:
            a = base.ggml_new_tensor_2d(ctx, GGML_TYPE_IDS[type_name], cols, rows)
            b = base.ggml_new_tensor_2d(ctx, GGML_TYPE_IDS["F32"], cols, x.shape[0])
            wb = np.ascontiguousarray(w_bytes).view(np.uint8).ravel()
            assert wb.nbytes == base.ggml_nbytes(a)
            ctypes.memmove(base.ggml_get_data(a), wb.ctypes.data, wb.nbytes)
            xb = np.ascontiguousarray(x, dtype=np.float32)
            ctypes.memmove(base.ggml_get_data(b), xb.ctypes.data, xb.nbytes)
            c = base.ggml_mul_mat(ctx, a, b)
            graph = base.ggml_new_graph(ctx)
            base.ggml_build_forward_expand(graph, c)
            cpu.ggml_graph_compute_with_ctx(ctx, graph, 1)
            out = np.empty((x.shape[0], rows), np.float32)
            ctypes.memmove(out.ctypes.data, base.ggml_get_data(c), out.nbytes)
            return out
        finally:
            base.ggml_free(ctx)

    return matmul


def activations(tokens=24, cols=512, seed=1) -> torch.Tensor:
    """SwiGLU-like inputs: mostly small, a few massive channels and one massive token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * 0.3
    x[:, 7] *= 60
    x[0] *= 40
    x[3, 100] = -0.0  # zeros and a block of zeros stay exact
    x[5, 256:] = 0
    return x


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q4_K", "Q6_K"])
def test_rounding_reproduces_ggml_quantized_matmul(ggml, type_name):
    fmt = GGML_TYPES[type_name]
    w = (torch.randn(32, 512, generator=torch.Generator().manual_seed(0)) * 0.05).half().float()
    x = activations()
    got = torch.from_numpy(ggml(to_bytes(w, fmt).numpy(), type_name, 32, 512, x.numpy()))
    g = grid(w, fmt)
    plain, ours = x @ g.T, round_activations(x, fmt) @ g.T
    scale = plain.abs().mean()
    err_plain = float((got - plain).abs().mean() / scale)
    err_ours = float((got - ours).abs().mean() / scale)
    assert err_plain > 1e-3  # the rounding is visible: float inputs would not match ggml
    if type_name == "Q4_1":  # Q8_1's block sum, used for Q4_1's offsets, is fp16 in ggml: not reproduced
        assert err_ours < err_plain / 5, (err_ours, err_plain)  # measured: 1.2e-3 vs 1.2e-2
    else:
        assert err_ours < 2e-6, (err_ours, err_plain)


def test_hooks_round_planned_layers_and_pass_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 8, bias=False))
    x = torch.randn(4, 256) * 0.3
    x[:, 3] = 20.0
    before = model(x)
    llama_cpp_activations(model, {"0.weight": "Q4_K", "1.weight": "F32"})  # F32 weights: llama.cpp leaves inputs float
    x.requires_grad_(True)
    after = model(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(model[1](model[0](round_activations(x, "q4_k"))), after)
    after.sum().backward()
    expected = model[0].weight.T @ model[1].weight.T.sum(-1)  # straight-through: the float model's gradient
    assert torch.allclose(x.grad, expected.expand_as(x), atol=1e-5)
