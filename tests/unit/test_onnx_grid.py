"""The QAT grid in ONNX Runtime's MatMulNBits: every llama.cpp block format, run by the real kernel."""

import numpy as np
import pytest
import torch

from edgekit.export.onnx_grid import affine, node_tensors
from edgekit.formats.ggml_blocks import dequantize_exact, quantize_exact

FORMATS = ["q8_0", "q4_0", "q5_0", "q4_1", "q4_k", "q6_k"]


def weight(rows=8, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :256] = w[0, :256].abs() + 0.01  # blocks of one sign: Q4_K/Q4_1 offsets at the ends of their range
    w[1, :256] = -w[1, :256].abs() - 0.01
    return w.half().float()


@pytest.mark.parametrize("fmt", FORMATS)
def test_affine_form_is_the_grid_and_fits_uint8(fmt):
    blk = quantize_exact(weight(), fmt)
    grid = dequantize_exact(blk)
    a = affine(blk)
    exact = fmt not in ("q4_k", "q4_1")
    assert torch.equal(a.weights(), grid) if exact else torch.allclose(a.weights(), grid, rtol=0, atol=1e-6)
    u = a.as_uint8()
    assert u.codes.min() >= 0 and u.codes.max() <= 255 and u.zero.min() >= 0 and u.zero.max() <= 255
    assert torch.equal(u.codes, u.codes.round()) and torch.equal(u.zero, u.zero.round())
    err = (u.weights() - grid).abs().reshape(*u.scale.shape, -1).amax(-1)
    if exact:
        assert torch.equal(u.weights(), grid)
    else:  # the zero moved to a k-times finer grid: at most half a fine step off
        assert (err <= 0.5 * u.scale + 1e-7).all()
        assert (a.scale / u.scale).median() >= 16  # most blocks: 16-17 fine steps per step
        assert err.max() > 0  # not exact: the test would notice if it claimed so


def run_matmulnbits(tensors: dict, x: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, k = tensors["B"].shape[0], x.shape[1]
    inits = [numpy_helper.from_array(tensors["B"], "B"), numpy_helper.from_array(tensors["scales"].astype(np.float32), "S")]
    inputs = ["A", "B", "S"]
    if tensors["zero_points"] is not None:
        inits.append(numpy_helper.from_array(tensors["zero_points"], "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=tensors["bits"],
                            block_size=tensors["block"], accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [x.shape[0], n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": x})[0]


@pytest.mark.parametrize("fmts,bits,block", [(["q4_0"], 4, 32), (["q5_0", "q8_0", "q6_k"], 8, 16), (["q4_k", "q4_1"], 8, 32)])
def test_onnx_runtime_computes_with_the_grid(fmts, bits, block):
    """A fused node (parts stacked row after row, like the builder's qkv) in ONNX Runtime's own
    kernel gives x @ W^T at fp32 accuracy, W the grid itself (Q4_K/Q4_1: its uint8 form, whose
    offsets are within half a fine step of the grid's, tested above)."""
    blks = [quantize_exact(weight(seed=i), f) for i, f in enumerate(fmts)]
    tensors = node_tensors([affine(b) for b in blks])
    assert (tensors["bits"], tensors["block"]) == (bits, block)
    assert (tensors["zero_points"] is not None) == ("q4_k" in fmts)
    grid = torch.cat([dequantize_exact(b) for b in blks])
    held = torch.cat([affine(b).at_block(block).as_uint8().weights() if bits == 8 else affine(b).weights() for b in blks])
    assert torch.equal(held, grid) == ("q4_k" not in fmts)
    x = np.random.default_rng(0).standard_normal((3, grid.shape[1])).astype(np.float32)
    want = x @ held.numpy().T
    np.testing.assert_allclose(run_matmulnbits(tensors, x), want, rtol=0, atol=1e-5 * np.abs(want).max())
