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

Scales: by default each step recomputes them with the format's own search (`FakeQuant`);
with `scale_refresh: N` the K-quant search (the costly one) runs every N steps and the codes
are re-rounded on the last scales in between.
With `scales: learn` the per-block scales of the symmetric block formats (Q8_0, Q5_0,
Q4_0) are parameters instead (LSQ, Esser et al., 2020: initialised by llama.cpp's own
quantizer, learned through the straight-through estimator, stored as the fp16 the file
holds); the export packs those scales and the codes they give (`LearnedScale.blocks`), so
the file is still exactly the trained grid. K-quant tensors keep recomputing their scales.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgekit.formats.ggml_blocks import BLOCK, K_FORMATS, Blocks, dequantize_exact, quantize, quantize_exact, regrid_exact
from edgekit.formats.ggml_blocks import GGML_TYPES as EXACT

# block formats whose scales can be learned: signed code range and the offset the file stores
LEARNABLE = {"q8_0": (-128, 127, 0), "q5_0": (-16, 15, 16), "q4_0": (-8, 7, 8)}


# optimizer steps taken in this process (a global torch hook counts them): with the tensor's version
# counter, what tells FakeQuant the weights changed, also under optimizers that write through raw
# pointers without advancing the version (bitsandbytes' 8-bit kernels)
_OPTIMIZER_STEPS = [0]
_STEP_HOOK = []


def _count_step(*_):
    _OPTIMIZER_STEPS[0] += 1


class FakeQuant(nn.Module):
    """w -> dequantize(quantize(fp16(w))) forward; identity gradient (straight-through).

    The grid is computed once per value of the weights (an in-place change advances the
    tensor's version; any optimizer step counts as a change too), so a tied weight, the
    micro-batches of a step and an evaluation share it; it is held between steps (one float
    copy of the weight). With `refresh` = N > 1, a K-quant tensor's scale search
    (seconds per forward for a whole model), and an importance-weighted Q4_0/Q5_0 one, runs on
    every N-th new value only; in between, the codes are re-rounded on the last scales
    (ggml_blocks.regrid_exact): a point of the same format, not necessarily the one llama.cpp's
    search would pick for the moved weights. With `importance` (the weight's per-column mean
    squared input, an importance matrix's), the search is llama.cpp's with that imatrix.
    The export always quantizes the final weights with the full search."""

    def __init__(self, fmt: str, refresh: int = 1, importance: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.refresh, self.importance = fmt, refresh, importance
        self._seen, self._values, self._scales, self._grid = None, 0, None, None
        if not _STEP_HOOK:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            _STEP_HOOK.append(register_optimizer_step_post_hook(_count_step))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        key = (w._version, w.data_ptr(), _OPTIMIZER_STEPS[0])
        if key != self._seen or self._grid is None:
            w16 = w.detach().half().float()
            if self._scales is not None and self._values % self.refresh:
                self._grid = regrid_exact(w16, self._scales)
            else:
                blk = quantize_exact(w16, self.fmt, self.importance)
                searched = self.fmt in K_FORMATS or (self.importance is not None and self.fmt != "q8_0")
                self._scales = blk if searched and self.refresh > 1 else None
                self._grid = dequantize_exact(blk)
            self._seen, self._values = key, self._values + 1
        # exactly the grid forward (w + (grid - w) can be an ulp off), identity gradient
        return self._grid.to(w.dtype) + (w - w.detach())


class LearnedScale(nn.Module):
    """w -> d * clamp(round(w / d)) per block of 32, with the block scales d learned (LSQ).
    d is kept as sign * exp(log|d|) (Adam steps change it relatively) and used at fp16, as
    the file stores it; rounding, fp16 casts and the clamp pass gradients straight through
    (the clamp: zero outside the range, LSQ's rule). Blocks whose initial scale is 0 (all
    weights 0) stay 0."""

    def __init__(self, w: torch.Tensor, fmt: str, d: torch.Tensor | None = None, lr_scale: float = 1.0):
        super().__init__()
        self.fmt = fmt
        init = (quantize(w.detach().half().float(), fmt).d if d is None else d).float()
        self.log_d = nn.Parameter(torch.log(init.abs().clamp_min(1e-30)))
        self.log_d.lr_scale = lr_scale  # the trainer gives these their own learning rate
        self.register_buffer("sign", torch.where(init < 0, -1.0, 1.0))
        self.register_buffer("dead", init == 0)

    def scale(self) -> torch.Tensor:
        """(R, C/32) block scales as the file stores them (fp16 values, float32 tensor)."""
        d = torch.where(self.dead, torch.zeros_like(self.log_d), self.sign * torch.exp(self.log_d))
        return d + (d.half().float() - d).detach()

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        lo, hi, _ = LEARNABLE[self.fmt]
        rows, cols = w.shape
        d = self.scale()[..., None]  # (R, nb, 1)
        x = w.reshape(rows, cols // BLOCK, BLOCK) / torch.where(d == 0, torch.ones_like(d), d)
        q = (x + (torch.round(x) - x).detach()).clamp(lo, hi)
        return torch.where(d == 0, torch.zeros_like(q), q), d

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w16 = w + (w.half().float() - w).detach()
        q, d = self.codes(w16)
        return (q * d).reshape(w.shape)

    @torch.no_grad()
    def blocks(self, w: torch.Tensor) -> Blocks:
        """The GGUF blocks of latent weights `w` on the learned scales: what forward computed."""
        q, d = self.codes(w.half().float())
        return Blocks(self.fmt, (q + LEARNABLE[self.fmt][2]).to(torch.int16).reshape(w.shape), d[..., 0].half())


def learned_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """{weight name: fp16 block scales} of every LearnedScale parametrization (tied weights once)."""
    out, seen = {}, set()
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            p = module.parametrizations.weight[0]
            if isinstance(p, LearnedScale) and id(p) not in seen:
                seen.add(id(p))
                out[f"{name}.weight"] = p.scale().detach().half()
    return out


def learned_blocks(model_dir: Path, plan: dict[str, str], scales: dict[str, torch.Tensor] | None,
                   importance: dict[str, torch.Tensor] | None = None) -> dict:
    """The GGUF blocks of a QAT student's saved latent weights where they are not llama.cpp's
    plain quantization of them: on its learned scales, or searched with its importance matrix."""
    from safetensors import safe_open

    scales, importance, blocks = scales or {}, importance or {}, {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if key in scales:
                    w = st.get_tensor(key).float()
                    blocks[key] = LearnedScale(w, EXACT[plan[key]], scales[key]).blocks(w)
                elif key in importance and EXACT.get(plan.get(key, "")):
                    blocks[key] = quantize_exact(st.get_tensor(key).half().float(), EXACT[plan[key]], importance[key])
    return blocks


def plan_types(model_dir: Path, mix: str = "q4_k_m") -> dict[str, str]:
    """{transformers weight name: GGML type name} as llama.cpp's `mix` quantizes this model
    (fallbacks included): the model is converted and quantized by llama.cpp, and each GGUF
    tensor is traced back to its weight by content (export.tensor_map). A weight llama.cpp
    splits into tensors of different types is planned as "mixed" (left in float by QAT)."""
    from edgekit.export.gguf_write import write_gguf
    from edgekit.export.llama_quantize import quantize_gguf
    from edgekit.export.tensor_map import layout
    from edgekit.formats.gguf_read import tensor_table

    with tempfile.TemporaryDirectory() as tmp:
        f16 = write_gguf(model_dir, Path(tmp) / "plan-F16.gguf", "f16")
        types = {t["name"]: t["type"] for t in tensor_table(quantize_gguf(f16, Path(tmp) / "plan.gguf", mix))}
        places = layout(model_dir, f16)
    plan: dict[str, str] = {}
    for gname, p in places.items():
        if gname in types:
            plan[p.hf] = types[gname] if plan.get(p.hf, types[gname]) == types[gname] else "mixed"
    cfg = json.loads((model_dir / "config.json").read_text())
    embed = next((p.hf for g, p in places.items() if g == "token_embd.weight"), None)
    if cfg.get("tie_word_embeddings") and embed in plan and "lm_head.weight" not in plan:
        plan["lm_head.weight"] = plan[embed]  # one tensor in the file
    return plan


def prepare(model: nn.Module, plan: dict[str, str], scales: str = "recompute",
            learned: dict[str, torch.Tensor] | None = None, scale_lr_ratio: float = 1.0, refresh: int = 1,
            importance: dict[str, torch.Tensor] | None = None) -> dict:
    """Register fake-quant parametrizations on every weight with an exact format: scales
    recomputed each step (FakeQuant; K-quant scales every `refresh` steps), or with `scales="learn"` learned for the LEARNABLE
    formats (LearnedScale; starting from `learned` scales when given, e.g. to rebuild a
    trained QAT model). `importance` ({weight: per-column mean squared input}) makes the
    recomputed scales llama.cpp's importance-weighted ones. Tied weights share one quantizer. Returns {"fake_quantized": {name:
    fmt}, "float": {name: type}, "learned_scales": [names]} for the report."""
    done, skipped, learn, shared = {}, {}, [], {}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if key not in plan or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        fmt = EXACT.get(plan[key])
        if fmt is None:
            skipped[key] = plan[key]
            continue
        if scales == "learn" and fmt in LEARNABLE:
            weight = module.weight
            if id(weight) not in shared:
                shared[id(weight)] = LearnedScale(weight, fmt, (learned or {}).get(key), scale_lr_ratio)
                learn.append(key)
            quantizer = shared[id(weight)]
        else:
            quantizer = FakeQuant(fmt, refresh, (importance or {}).get(key))
        parametrize.register_parametrization(module, "weight", quantizer, unsafe=True)
        done[key] = fmt
    return {"fake_quantized": done, "float": skipped, "learned_scales": learn}


def latent_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each fake-quantized weight's latent value under its plain
    name (what `strip` would leave), without removing the parametrizations."""
    suffix = ".parametrizations.weight.original"
    return {k.removesuffix(suffix) + ".weight" if k.endswith(suffix) else k: v.detach()
            for k, v in model.state_dict().items() if ".parametrizations.weight." not in k or k.endswith(suffix)}


def strip(model: nn.Module, on_grid: bool = False) -> nn.Module:
    """Remove the parametrizations, keeping the latent (unquantized) weights for export, or
    with `on_grid` the fake-quantized weights themselves: the same forward, computed once
    instead of on every call (the K-quant search costs seconds per forward), for evaluation."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=on_grid)
    return model
