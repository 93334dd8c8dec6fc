"""QAT on llama.cpp's exact grid: the exported file computes what the fake-quant model computed."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest


from edgekit.cli import main
from edgekit.quant.qat import plan_types


def test_plan_reads_llama_cpp_choices(tiny_teacher_dir):
    plan = plan_types(tiny_teacher_dir, "q4_k_m")
    # width 64 is not a multiple of 256: llama.cpp falls back from Q4_K for these rows
    assert plan["model.layers.0.self_attn.q_proj.weight"] in ("Q5_0", "Q8_0", "Q4_0", "Q5_1", "Q4_1")
    assert "model.norm.weight" not in plan  # 1-D: llama.cpp keeps norms in F32, nothing to plan
    assert plan["lm_head.weight"] == plan["model.embed_tokens.weight"]


def saved(qat_dir, name: str) -> dict:
    """A qat stage's tensors file (learned scales, importance), {} when it wrote none."""
    from safetensors.torch import load_file

    return load_file(qat_dir / f"{name}.safetensors") if (qat_dir / f"{name}.safetensors").is_file() else {}


def assert_onnx_holds_the_trained_grid(folder, qat_dir):
    """Every MatMulNBits node dequantizes to its weights' QAT grid (stacked for the fused qkv node):
    exactly, or within half a fine step for Q4_1/Q4_K, whose offsets are moved onto an integer zero."""
    import onnx
    import torch
    from onnx import helper
    from safetensors.torch import load_file

    from edgekit.export.onnx_grid import _hf_keys, dequantize_node
    from edgekit.quant.qat import FakeQuant, LearnedScale

    plan = json.loads((qat_dir / "qat_plan.json").read_text())["fake_quantized"]
    scales, importance = saved(qat_dir, "qat_scales"), saved(qat_dir, "qat_importance")
    latent = load_file(qat_dir / "model" / "model.safetensors")
    with tempfile.TemporaryDirectory() as tmp:  # a run's published files are hard links, which onnx.load refuses
        model = onnx.load(str(shutil.copytree(folder, Path(tmp) / "m") / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    for node in nodes:
        keys = _hf_keys(node.input[1], tied="lm_head.weight" not in latent)
        grids = [(LearnedScale(latent[k], plan[k], scales[k]) if k in scales
                  else FakeQuant(plan[k], importance=importance.get(k)))(latent[k]).detach() for k in keys]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        held = dequantize_node(node, attrs, inits)
        if any(plan[k] in ("q4_1", "q4_k") for k in keys):
            assert torch.allclose(held, torch.cat(grids), rtol=0, atol=1e-3), node.name
        else:
            assert torch.equal(held, torch.cat(grids)), node.name
    assert len(nodes) >= 9


def assert_file_holds_the_trained_grid(gguf_path, qat_dir, min_checked=20):
    """Every fake-quantized weight, dequantized from the GGUF llama.cpp wrote, equals the
    weight the QAT forward used, bit for bit."""
    import numpy as np
    import torch
    from gguf import quants
    from safetensors.torch import load_file

    from edgekit.quant.qat import FakeQuant, LearnedScale
    from tests.conftest import file_rows

    scales, importance = saved(qat_dir, "qat_scales"), saved(qat_dir, "qat_importance")
    moved = 0
    plan = json.loads((qat_dir / "qat_plan.json").read_text())["fake_quantized"]
    latent = load_file(qat_dir / "model" / "model.safetensors")
    placed = file_rows(qat_dir / "model", gguf_path)
    checked = 0
    for key, fmt in plan.items():
        if key not in latent:
            continue  # lm_head: tied to the embeddings, one tensor in the file
        t, rows = placed[key]
        got = quants.dequantize(t.data, t.tensor_type).reshape(latent[key].shape)
        if key in scales:  # learned scales: the file holds them and the codes they give
            learned = LearnedScale(latent[key], fmt, scales[key])
            want = learned(latent[key]).detach().numpy()
            moved += int(not torch.equal(scales[key], LearnedScale(latent[key], fmt).scale().half()))
        else:
            want = FakeQuant(fmt, importance=importance.get(key))(latent[key]).detach().numpy()
        assert np.array_equal(got, want[rows]), key
        checked += 1
    assert checked >= min_checked
    assert not scales or moved > 0.5 * len(scales)  # the scales did train away from llama.cpp's own choice


def test_qat_mix_must_be_exported(tiny_recipe, capsys):
    text = tiny_recipe.read_text().replace("  - {type: export, formats: [f16, q8_0, onnx_int4]}",
                                           "  - {type: qat}\n  - {type: export, formats: [f16, q8_0]}")
    tiny_recipe.write_text(text)
    assert main(["validate", str(tiny_recipe)]) == 2
    assert "qat.mix is 'q4_k_m' but export.formats" in capsys.readouterr().err


def test_importance_weighting_of_a_q4_1_mix_is_refused_before_training(tiny_recipe, capsys):
    """llama.cpp weights Q4_1 with an importance matrix through a search edgekit does not reproduce:
    validate says so instead of the fake quantizer failing at the first step."""
    text = tiny_recipe.read_text().replace("  - {type: export, formats: [f16, q8_0, onnx_int4]}",
                                           "  - {type: qat, mix: q4_1, importance: imatrix}\n  - {type: export, formats: [f16, q4_1]}")
    tiny_recipe.write_text(text)
    assert main(["validate", str(tiny_recipe)]) == 2
    assert "no importance-weighted Q4_1 quantizer" in capsys.readouterr().err


def test_gptq_init_puts_the_fake_quantizers_on_gptqs_grid(tiny_teacher_dir):
    """Starting QAT from GPTQ means the fake-quantized forward computes with GPTQ's weights:
    the exact quantizer, run again on GPTQ's decoded blocks, gives those values back, except
    in the few blocks where GPTQ's updates left no weight on the code that set the block's
    scale (measured: 98.9% of weights identical here)."""
    import torch

    from edgekit.models.loading import load_causal_lm
    from edgekit.formats.ggml_blocks import GGML_TYPES, dequantize_exact
    from edgekit.quant.ptq import gptq_gguf_blocks
    from edgekit.quant.qat import FakeQuant

    model = load_causal_lm(tiny_teacher_dir)
    plan = plan_types(tiny_teacher_dir, "q4_k_m")
    torch.manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (4, 32))
    blocks = gptq_gguf_blocks(model, plan, rows, tied=bool(model.config.tie_word_embeddings))
    assert blocks
    same = total = 0
    for key, blk in blocks.items():
        w = dequantize_exact(blk).float()
        again = FakeQuant(GGML_TYPES[plan[key]])(w).detach()
        same += int((again == w).sum())
        total += w.numel()
    assert same / total > 0.98


@pytest.mark.parametrize("fmt,weighted", [("q4_k", False), ("q5_0", True), ("q4_k", True)])
def test_fake_quant_searches_once_per_weight_value_and_every_nth_value_with_refresh(monkeypatch, fmt, weighted):
    """The grid is cached per value of the weights (an in-place optimizer step makes a new one);
    with refresh=3 the scale search (K-quants; Q5_0 when importance-weighted) runs on the 1st and
    4th values only, and each forward is the grid on the scales of the last search."""
    import torch

    from edgekit.formats.ggml_blocks import dequantize_exact, quantize_exact, regrid_exact
    from edgekit.quant import qat

    searches = []
    real = qat.quantize_exact
    monkeypatch.setattr(qat, "quantize_exact", lambda w, fmt, imp=None: searches.append(fmt) or real(w, fmt, imp))
    importance = torch.rand(256, generator=torch.Generator().manual_seed(0)) + 0.1 if weighted else None
    w = torch.nn.Parameter(torch.randn(4, 256) * 0.05)
    fq = qat.FakeQuant(fmt, refresh=3, importance=importance)
    first = fq(w)
    assert torch.equal(fq(w), first) and len(searches) == 1  # same value: no new search
    blk = quantize_exact(w.detach().half().float(), fmt, importance)
    opt = torch.optim.SGD([w], lr=1e-3)
    for value in range(2, 6):
        w.grad = torch.randn_like(w)
        opt.step()
        got = fq(w).detach()
        w16 = w.detach().half().float()
        if value == 4:
            blk = quantize_exact(w16, fmt, importance)
            assert torch.equal(got, dequantize_exact(blk))
        else:
            assert torch.equal(got, regrid_exact(w16, blk))
    assert len(searches) == 2
    w.grad = None
    (fq(w) * torch.ones(4, 256)).sum().backward()
    assert torch.equal(w.grad, torch.ones(4, 256))  # straight-through


def test_fake_quant_sees_an_optimizer_that_writes_through_data():
    """bitsandbytes' 8-bit optimizers write the weights through raw pointers, which does not advance
    the tensor's version: an optimizer step must still give a new grid."""
    import torch

    from edgekit.formats.ggml_blocks import grid
    from edgekit.quant.qat import FakeQuant

    class PointerWrites(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad, alpha=-0.5)  # .data: no version bump, as a C kernel's write

    w = torch.nn.Parameter(torch.randn(4, 64) * 0.05)
    fq = FakeQuant("q5_0")
    before = fq(w).detach()
    version = w._version
    w.grad = torch.full_like(w, 0.01)
    PointerWrites([w]).step()
    assert w._version == version
    after = fq(w).detach()
    assert not torch.equal(after, before) and torch.equal(after, grid(w.detach().half().float(), "q5_0"))
