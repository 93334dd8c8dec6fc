"""Carry a QAT student's trained grid into the int4 ONNX that onnxruntime-genai's builder wrote.

The builder quantizes every MatMul to int4 (block 32, round-to-nearest) by itself, which
would throw away the grid QAT trained on. Each llama.cpp block format is an affine grid,
w = scale * (code - zero) per block, which ONNX Runtime's `MatMulNBits` can hold:

    Q4_0               scale d,     zero 8                  4-bit, block 32   exact
    Q8_0, Q5_0         scale d,     zero 0 / 16             8-bit, block 32   exact
    Q6_K               scale d*sc,  zero 32                 8-bit, block 16   exact
    Q4_K               scale d*sc,  zero dmin*m / (d*sc)    8-bit, block 32   offset within 1/34 step
    Q4_1               scale d,     zero -m / d             8-bit, block 32   offset within 1/34 step

A node whose weights are all Q4_0 stays 4-bit; any other becomes 8-bit with uint8 zero
points, every code shifted so that its zero is an integer. Q4_K and Q4_1 have real-valued
zeros: ONNX Runtime takes float zero points only at 4 bits, and there its CPU kernel runs
~20x slower (measured: 845 vs 40 us for a 576x1536 MatMul), so their codes are spread k times
finer (k <= 17) to put the zero on an integer, which moves each block's offset by at most
half of 1/k of a step. Fused nodes (the builder packs q, k, v into one qkv MatMul) hold their
parts' grids row after row; a tied embedding (`GatherBlockQuantized`) reads the same codes.

Safety net: every replaced node is compared with the builder's own dequantized weights; a
grid that is not close to them means the names were matched wrongly, and the export fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekit.errors import EdgekitError
from edgekit.formats.ggml_blocks import GGML_TYPES, divide_or_zero, quantize_exact

PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


@dataclass
class Affine:
    """w = scale * (codes - zero), per block of `block` along each row."""
    codes: torch.Tensor  # (R, C) float32 integer values
    scale: torch.Tensor  # (R, C/block) float32
    zero: torch.Tensor   # (R, C/block) float32
    block: int
    fmt: str

    def at_block(self, block: int) -> "Affine":
        k = self.block // block
        return Affine(self.codes, self.scale.repeat_interleave(k, 1), self.zero.repeat_interleave(k, 1), block, self.fmt)

    def weights(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        q = self.codes.reshape(rows, cols // self.block, self.block)
        return ((q - self.zero[..., None]) * self.scale[..., None]).reshape(rows, cols)

    def as_uint8(self) -> "Affine":
        """The same grid with codes and zeros in 0..255: shifted where the zero is an integer,
        else spread k times finer (scale / k) with the zero rounded to the finer grid."""
        rows, cols = self.codes.shape
        q = self.codes.reshape(rows, cols // self.block, self.block)
        if self.fmt not in REAL_ZERO:
            return Affine((q - self.zero[..., None] + 128).reshape(rows, cols), self.scale,
                          torch.full_like(self.zero, 128.0), self.block, self.fmt)
        k = torch.ones_like(self.zero)
        for cand in range(1, 18):  # the largest k that keeps codes 0..15k and the zero in 0..255
            r = torch.round(cand * self.zero)
            lift = (-r).clamp_min(0)
            ok = (lift + 15 * cand <= 255) & (lift + r <= 255)
            k = torch.where(ok, torch.full_like(k, cand), k)
        r = torch.round(k * self.zero)
        lift = (-r).clamp_min(0)
        codes = k[..., None] * q + lift[..., None]
        flat = self.scale == 0  # every weight of the block is -zero*scale = the block's offset: not representable
        return Affine(codes.reshape(rows, cols), torch.where(flat, self.scale, self.scale / k), lift + r, self.block, self.fmt)


REAL_ZERO = ("q4_k", "q4_1")


def affine(blk) -> Affine:
    """The affine form of llama.cpp blocks (Blocks or KBlocks) of any exact format."""
    fmt, q = blk.fmt, blk.q.float()
    if fmt in ("q8_0", "q4_0", "q5_0"):
        d = blk.d.float()
        return Affine(q, d, torch.full_like(d, {"q8_0": 0, "q4_0": 8, "q5_0": 16}[fmt]), 32, fmt)
    if fmt == "q4_1":
        d, m = blk.d.float(), blk.m.float()
        return Affine(q, d, divide_or_zero(-m, d), 32, fmt)
    rows = q.shape[0]
    d1 = (blk.d.float()[..., None] * blk.sc.float()).reshape(rows, -1)  # per sub-block, as ggml computes it
    if fmt == "q6_k":
        return Affine(q, d1, torch.full_like(d1, 32.0), 16, fmt)
    m1 = (blk.dmin.float()[..., None] * blk.m.float()).reshape(rows, -1)
    return Affine(q, d1, divide_or_zero(m1, d1), 32, fmt)


def node_tensors(parts: list[Affine]) -> dict:
    """MatMulNBits initializers for the parts stacked row after row:
    {"bits", "block", "B", "scales", "zero_points" (uint8, or None for the default)}."""
    block = min(p.block for p in parts)
    if all(p.fmt == "q4_0" for p in parts):
        codes, scale = torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts])
        rows, cols = codes.shape
        q = codes.to(torch.uint8).reshape(rows, cols // block, block)
        return {"bits": 4, "block": block, "B": (q[..., 0::2] | (q[..., 1::2] << 4)).numpy(),
                "scales": scale.numpy(), "zero_points": None}
    parts = [p.at_block(block).as_uint8() for p in parts]
    codes, scale, zero = (torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero"))
    rows, cols = codes.shape
    return {"bits": 8, "block": block, "B": codes.to(torch.uint8).reshape(rows, cols // block, block).numpy(),
            "scales": scale.numpy(), "zero_points": None if bool((zero == 128).all()) else zero.to(torch.uint8).numpy()}


def _hf_keys(weight_init: str, tied: bool) -> list[str] | None:
    """Transformers weight names behind a builder initializer name, e.g.
    model.layers.3.attn.qkv_proj.MatMul.weight_Q4 -> [...q_proj.weight, ...k_proj.weight, ...v_proj.weight]."""
    if weight_init.startswith("lm_head."):
        return ["model.embed_tokens.weight" if tied else "lm_head.weight"]
    m = re.match(r"model\.layers\.(\d+)\.(attn|mlp)\.(\w+?)\.MatMul\.", weight_init)
    if not m:
        return None
    layer, block, proj = m.groups()
    prefix = f"model.layers.{layer}.{'self_attn' if block == 'attn' else 'mlp'}"
    return [f"{prefix}.{p}.weight" for p in PARTS.get(proj, (proj,))]


def carry_qat_grid(folder: Path, model_dir: Path, plan: dict[str, str], blocks: dict | None = None) -> dict:
    """Rewrite the MatMulNBits weights of the builder's `folder` with the QAT grid of the latent
    weights in `model_dir` (`plan`: {weight: GGML type}; `blocks`: learned-scale blocks).
    Returns {"grid": {node name: "int4"|"int8"}, "builder": {node name: why}} for the export's metadata."""
    import onnx
    from onnx import helper, numpy_helper
    from safetensors import safe_open

    model = onnx.load(str(folder / "model.onnx"))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            tensors.update({k: f for k in st.keys()})
    tied = "lm_head.weight" not in tensors
    gathers = {n.input[2]: n for n in graph.node if n.op_type == "GatherBlockQuantized"}  # by scales name
    producers = {o: n for n in graph.node for o in n.output}
    done, kept = {}, {}
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        keys = _hf_keys(node.input[1], tied)
        types = [plan.get(k) for k in keys or []]
        if not keys or any(t not in GGML_TYPES for t in types):
            kept[node.name] = "no exact QAT grid for its weights"
            continue
        parts = [affine((blocks or {}).get(k) or quantize_exact(_fp16_weight(tensors[k], k), GGML_TYPES[t]))
                 for k, t in zip(keys, types)]
        new = node_tensors(parts)
        gather = gathers.get(node.input[2])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        _check_close(node.name, torch.cat([p.weights() for p in parts]), dequantize_node(node, attrs, inits))
        dtype = numpy_helper.to_array(inits[node.input[2]]).dtype
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(new["B"], node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(new["scales"].astype(dtype), node.input[2]))
        del node.input[3:]
        zname = node.input[1].removesuffix("_Q4") + "_zero_points"
        if new["zero_points"] is not None:
            graph.initializer.append(numpy_helper.from_array(new["zero_points"], zname))
            node.input.append(zname)
        _set_attrs(node, bits=new["bits"], block_size=new["block"])
        if gather is not None:  # the tied embedding reads the same codes and scales
            _set_attrs(gather, bits=new["bits"], block_size=new["block"])
            del gather.input[3:]
            if new["zero_points"] is not None:
                gather.input.append(zname)
            reshape = producers[gather.input[0]]
            shape = f"{node.input[1]}_as_rows"
            graph.initializer.append(numpy_helper.from_array(
                np.array([attrs["N"], attrs["K"] * new["bits"] // 8], dtype=np.int64), shape))
            reshape.input[1] = shape
        done[node.name] = f"int{new['bits']}"
    for f in ("model.onnx", "model.onnx.data"):
        (folder / f).unlink(missing_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    return {"grid": done, "builder": kept}


def _fp16_weight(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as st:
        return st.get_tensor(key).half().float()  # QAT and the GGUF quantize the fp16 rounding


def dequantize_node(node, attrs: dict, inits: dict) -> torch.Tensor:
    """The builder's own weights of a MatMulNBits node (its symmetric int4 or given zero points)."""
    from onnx import numpy_helper

    bits, block, n, k = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
    raw = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)
    q = np.stack([raw & 0x0F, raw >> 4], -1).reshape(n, -1) if bits == 4 else raw
    q = q[:, :k].astype(np.float32).reshape(n, -1, block)
    scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, -1)
    zero = 2.0 ** (bits - 1)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype == np.uint8 and bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :scale.shape[1]]
        zero = zp.astype(np.float32).reshape(n, -1)[..., None]
    return torch.from_numpy(((q - zero) * scale[..., None]).reshape(n, k))


def _check_close(name: str, grid: torch.Tensor, builder: torch.Tensor) -> None:
    if grid.shape != builder.shape:
        raise EdgekitError(f"ONNX node {name} holds a {tuple(builder.shape)} weight, the QAT grid is {tuple(grid.shape)}",
                           "the builder's layout is not the one edgekit knows; export onnx_int4 without a qat stage")
    rel = ((grid - builder).norm() / builder.norm().clamp_min(1e-12)).item()
    if rel > 0.5:  # int4 round-to-nearest is ~0.1 away; a wrong tensor or row order is ~1.4
        raise EdgekitError(f"ONNX node {name}: the QAT grid is {rel:.2f} (relative) away from the builder's own weights",
                           "the builder's tensor names or row order changed; export onnx_int4 without a qat stage")


def _set_attrs(node, **values) -> None:
    from onnx import helper

    keep = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend(keep + [helper.make_attribute(k, v) for k, v in values.items()])
