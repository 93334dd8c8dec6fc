"""Post-training quantization: GPTQ on llama.cpp's grid (gptq.py), GPTQ/AWQ checkpoints
through llm-compressor, and both carried into GGUF files that llama.cpp runs."""


import gguf
import numpy as np
import pytest
import torch

from edgekit.formats.ggml_blocks import dequantize_exact, pack_exact, quantize_exact
from edgekit.quant.gptq import gptq

FORMATS = [("q4_0", 256), ("q5_0", 576), ("q4_1", 256), ("q8_0", 256), ("q4_k", 512), ("q6_k", 512)]


@pytest.mark.parametrize("fmt,cols", FORMATS)
def test_gptq_on_the_gguf_grid_beats_rounding(fmt, cols):
    """Same grid, same file format: GPTQ's codes reproduce the layer's outputs better than
    llama.cpp's rounding, and gguf's own decoder reads the packed blocks back exactly."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, cols, generator=g) * 0.05
    x = torch.randn(1024, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.2 + torch.eye(cols))
    h = 2 * x.T @ x / x.shape[0]
    blk = gptq(w, h, fmt)
    out_err = lambda q: float(((w - q) @ x.T).pow(2).mean())
    assert out_err(dequantize_exact(blk)) < 0.7 * out_err(dequantize_exact(quantize_exact(w, fmt)))
    decoded = gguf.quants.dequantize(pack_exact(blk).numpy(), gguf.GGMLQuantizationType[fmt.upper()])
    assert np.array_equal(decoded.reshape(w.shape), dequantize_exact(blk).numpy())


def test_gptq_handles_dead_inputs_and_needs_whole_blocks():
    w = torch.randn(8, 64)
    h = torch.eye(64)
    h[5, 5] = 0  # an input channel calibration never saw: its weights go to zero
    assert dequantize_exact(gptq(w, h, "q8_0"))[:, 5].abs().max() == 0
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq(torch.randn(4, 96), torch.eye(96), "q4_k")


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory, tiny_tokenizer_dir):
    """256-wide, so llama.cpp's Q4_K_M gives real Q4_K / Q6_K tensors (no Q5_0 fallback)."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("wide") / "wide", tiny_tokenizer_dir, layers=2, hidden=256)


def test_gptq_blocks_reach_the_gguf_unchanged(wide_teacher, tmp_path):
    """write_gguf(blocks=...) stores GPTQ's codes and scales as found, rotary rows permuted."""
    from edgekit.export.gguf_write import write_gguf
    from edgekit.models.loading import load_causal_lm
    from edgekit.quant.ptq import gptq_gguf_blocks
    from edgekit.quant.qat import plan_types

    plan = plan_types(wide_teacher, "q4_k_m")
    model = load_causal_lm(wide_teacher)
    rows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    blocks = gptq_gguf_blocks(model, plan, rows, tied=True)
    assert {b.fmt for b in blocks.values()} >= {"q4_k", "q6_k"}
    out = write_gguf(wide_teacher, tmp_path / "w.gguf", "q4_k_m", types=plan, blocks=blocks)
    from tests.conftest import file_rows

    placed = file_rows(wide_teacher, out)
    permuted = 0
    for key, blk in blocks.items():
        if key not in placed:
            assert key == "lm_head.weight"  # tied: the embedding's tensor
            continue
        t, rows = placed[key]
        want = dequantize_exact(blk).numpy()[rows]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert t.tensor_type.name == blk.fmt.upper() and np.array_equal(got, want), key
        permuted += int((rows != np.arange(len(rows))).any())
    assert permuted > 0  # llama's Q/K rows: the packed rows moved whole


