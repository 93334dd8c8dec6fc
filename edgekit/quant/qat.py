"""Format-faithful QAT: fake-quantize each weight with the exact format llama.cpp will give it.

The plan comes from llama.cpp itself: the student is exported to F16 and quantized by
llama.cpp's Q4_K_M (or other) mix once, and the type llama.cpp chose for each tensor is
read back, fallbacks included (rows not divisible by 256 get Q5_0, not Q4_K). Each weight
with an exact quantizer in `ggml_blocks` is then trained through that quantizer applied
to its fp16 rounding, which is precisely what llama.cpp computes when it quantizes the
exported F16 file. So exporting the latent weights and quantizing them with llama.cpp
reproduces the trained grid bit for bit for those tensors.

Every type llama.cpp's Q4_K_M, Q4_0 and Q8_0 mixes choose (Q4_K, Q6_K, Q5_0, Q8_0, Q4_0,
Q4_1) has an exact quantizer; F32 tensors (norms) stay float. The export writes the
trained grid itself (`gguf_write.write_gguf(types=plan)`), and parity is measured.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgekit.quant.ggml_blocks import GGML_TYPES as EXACT
from edgekit.quant.ggml_blocks import grid


class FakeQuant(nn.Module):
    """w -> dequantize(quantize(fp16(w))) forward; identity gradient (straight-through)."""

    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        on_grid = grid(w.detach().half().float(), self.fmt).to(w.dtype)
        # exactly the grid forward (w + (grid - w) can be an ulp off), identity gradient
        return on_grid + (w - w.detach())


def plan_types(model_dir: Path, mix: str = "q4_k_m") -> dict[str, str]:
    """{transformers weight name: GGML type name} as llama.cpp's `mix` quantizes this model."""
    from edgekit.export.gguf_read import tensor_table
    from edgekit.export.gguf_write import gguf_name, tensor_name_map, write_gguf
    from edgekit.export.llama_quantize import quantize_gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    name_map = tensor_name_map(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        f16 = write_gguf(model_dir, Path(tmp) / "plan-F16.gguf", "f16")
        types = {t["name"]: t["type"] for t in tensor_table(quantize_gguf(f16, Path(tmp) / "plan.gguf", mix))}
    from safetensors import safe_open

    plan = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                g = gguf_name(name_map, key, cfg["model_type"])
                if g in types:
                    plan[key] = types[g]
    if cfg.get("tie_word_embeddings") and "model.embed_tokens.weight" in plan:
        plan["lm_head.weight"] = plan["model.embed_tokens.weight"]  # one tensor in the file
    return plan


def prepare(model: nn.Module, plan: dict[str, str]) -> dict:
    """Register fake-quant parametrizations on every weight with an exact format.
    Returns {"fake_quantized": {name: fmt}, "float": {name: type}} for the report."""
    done, skipped = {}, {}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if key not in plan or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        fmt = EXACT.get(plan[key])
        if fmt is None:
            skipped[key] = plan[key]
            continue
        parametrize.register_parametrization(module, "weight", FakeQuant(fmt), unsafe=True)
        done[key] = fmt
    return {"fake_quantized": done, "float": skipped}


def strip(model: nn.Module, on_grid: bool = False) -> nn.Module:
    """Remove the parametrizations, keeping the latent (unquantized) weights for export, or
    with `on_grid` the fake-quantized weights themselves: the same forward, computed once
    instead of on every call (the K-quant search costs seconds per forward), for evaluation."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=on_grid)
    return model
