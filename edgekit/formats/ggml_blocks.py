"""llama.cpp's block formats in PyTorch, bit for bit: quantize, dequantize, pack.

Each format quantizes rows of a 2-D weight (out, in) in blocks of 32 consecutive input
values, exactly as llama.cpp's reference quantizers do (ggml-quants.c,
`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `quantize_row_q5_0_ref`,
`quantize_row_q4_1_ref`): float32 arithmetic, the same rounding, fp16 scales. So the
weights a QAT student trains against are the weights llama.cpp computes with, and
`pack` writes the blocks a GGUF stores (`gguf.quants.quantize` gives the same bytes; the
tests check).

Block layouts (little-endian), per 32 weights:
    Q8_0: d:f16, q:int8[32]                          w = d*q
    Q4_0: d:f16, qs:u8[16] (q[j] | q[j+16]<<4)       w = d*(q-8)
    Q5_0: d:f16, qh:u32 (bit j = q[j]>>4), qs:u8[16]  w = d*(q-16)
    Q4_1: d:f16, m:f16, qs:u8[16]                    w = d*q + m
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgekit.formats import EXACT_TYPES, kquants

BLOCK = 32


@dataclass
class Blocks:
    """Quantized weight: integer codes (R, C) and per-block fp16 scales/mins (R, C/32)."""
    fmt: str
    q: torch.Tensor  # (R, C) int16 codes (unsigned for Q4/Q5, signed for Q8_0)
    d: torch.Tensor  # (R, C/32) float16
    m: torch.Tensor | None = None  # (R, C/32) float16, Q4_1 only


def _blocks(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"row length {cols} is not a multiple of {BLOCK}")
    return w.float().reshape(rows, cols // BLOCK, BLOCK)  # (R, nb, 32)


def _signed_absmax(b: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude, sign kept (first one on ties, as llama.cpp)."""
    return b.gather(-1, b.abs().argmax(-1, keepdim=True))  # (R, nb, 1)


def divide_or_zero(num, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (a block of zeros has no scale), in C's float order."""
    return torch.where(den == 0, torch.zeros_like(den), num / torch.where(den == 0, torch.ones_like(den), den))


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds halves to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize(w: torch.Tensor, fmt: str) -> Blocks:
    b = _blocks(w)
    if fmt == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127
        q = roundf(b * divide_or_zero(1.0, d))
    elif fmt in ("q4_0", "q5_0"):
        half = 8 if fmt == "q4_0" else 16
        d = _signed_absmax(b) / -half
        q = torch.trunc(b * divide_or_zero(1.0, d) + (half + 0.5)).clamp(0, 2 * half - 1)
    elif fmt == "q4_1":
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = torch.trunc((b - lo) * divide_or_zero(1.0, d) + 0.5).clamp(0, 15)
        return Blocks(fmt, q.to(torch.int16).reshape(w.shape), d[..., 0].half(), lo[..., 0].half())
    else:
        raise ValueError(f"no exact block quantizer for '{fmt}'")
    return Blocks(fmt, q.to(torch.int16).reshape(w.shape), d[..., 0].half())


def quantize_weighted(w: torch.Tensor, fmt: str, importance: torch.Tensor) -> Blocks:
    """quantize_row_q4_0_impl / quantize_row_q5_0_impl: Q4_0 / Q5_0 with an importance matrix,
    `importance` (C,) the per-column mean squared activation: each block's scale searched
    (make_qx_quants) with value weights importance * sqrt(sigma2 + x^2), sigma2 the row's mean
    square. Q8_0 ignores an importance matrix in llama.cpp, and so here."""
    if fmt == "q8_0":
        return quantize(w, fmt)
    if fmt not in ("q4_0", "q5_0"):
        raise ValueError(f"no exact importance-weighted quantizer for '{fmt}'")
    b = _blocks(w)
    rows, nb, _ = b.shape
    x = b.reshape(-1, BLOCK).T.contiguous()  # (32, R * nb): a block down a column
    flat = w.float().T.contiguous()  # the row's sum of squares in C's order
    sigma2 = (kquants.seq_sum(flat * flat) / kquants.f32(w.shape[1])).repeat_interleave(nb)
    qw = kquants.column_weights(importance, rows, BLOCK)
    weights = qw * (sigma2 + x * x).double().sqrt().float()
    step = 1 << 15  # blocks per pass: bounds the search's (32, n, 18) candidates
    parts = [kquants.make_qx_quants(x[:, i:i + step], 8 if fmt == "q4_0" else 16, weights[:, i:i + step])
             for i in range(0, x.shape[1], step)]
    d, q = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], 1)
    return Blocks(fmt, q.T.reshape(w.shape).to(torch.int16), d.reshape(rows, nb).half())


def regrid(w: torch.Tensor, blk: Blocks) -> torch.Tensor:
    """Q4_0 / Q5_0 grid of `w` on `blk`'s block scales, the codes re-rounded (kquants.regrid_k's
    counterpart: QAT between two importance-weighted scale searches). (R, C) float32."""
    half = {"q4_0": 8, "q5_0": 16}[blk.fmt]
    b, d = _blocks(w), blk.d.float()[..., None]
    q = torch.round(b * divide_or_zero(1.0, d)).clamp(-half, half - 1)
    q = torch.where(d != 0, q, blk.q.float().reshape(b.shape) - half)
    return (d * q).reshape(w.shape)


def dequantize(blk: Blocks) -> torch.Tensor:
    rows, cols = blk.q.shape
    q = blk.q.float().reshape(rows, cols // BLOCK, BLOCK)
    d = blk.d.float()[..., None]
    offset = {"q8_0": 0, "q4_0": 8, "q5_0": 16, "q4_1": 0}[blk.fmt]
    w = d * (q - offset)
    if blk.m is not None:
        w = w + blk.m.float()[..., None]
    return w.reshape(rows, cols)


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """dequantize(quantize(w)) forward, identity backward (straight-through estimator)."""
    return grid(w.detach(), fmt).to(w.dtype) + (w - w.detach())


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(*x.shape[:-1], -1)  # (R, nb) f16 -> (R, nb*2)


def pack(blk: Blocks) -> torch.Tensor:
    """The GGUF bytes of a quantized weight: (R, nb * block_bytes) uint8."""
    rows, cols = blk.q.shape
    nb = cols // BLOCK
    q = blk.q.reshape(rows, nb, BLOCK)
    d = blk.d.reshape(rows, nb, 1).contiguous().view(torch.uint8)  # (R, nb, 2)
    if blk.fmt == "q8_0":
        body = [d, q.to(torch.int8).view(torch.uint8)]
    else:
        lo = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
        body = [d]
        if blk.fmt == "q4_1":
            body.append(blk.m.reshape(rows, nb, 1).contiguous().view(torch.uint8))
        if blk.fmt == "q5_0":
            bits = (q >> 4) & 1  # (R, nb, 32) -> little-endian u32
            weights = (2 ** torch.arange(8)).reshape(1, 1, 1, 8)
            body.append((bits.reshape(rows, nb, 4, 8) * weights).sum(-1).to(torch.uint8))
        body.append(lo.to(torch.uint8))
    return torch.cat(body, -1).reshape(rows, -1)


# ---------------------------------------------------------------- every exact format, by GGML type

K_FORMATS = ("q4_k", "q6_k")
GGML_TYPES = EXACT_TYPES  # GGML type -> exact format, from the one table in edgekit.formats


def quantize_exact(w: torch.Tensor, fmt: str, importance: torch.Tensor | None = None):
    """Blocks (or K-quant super-blocks) of w in any exact format; with `importance` (C,), what
    llama.cpp's quantizer gives with an importance matrix (Q4_1 has none here: a ValueError;
    `qat.importance` refuses the q4_1 mix up front)."""
    if fmt in K_FORMATS:
        return kquants.quantize_k(w, fmt, importance)
    return quantize(w, fmt) if importance is None else quantize_weighted(w, fmt, importance)


def regrid_exact(w: torch.Tensor, blk) -> torch.Tensor:
    """The grid of `w` on the scales of `blk` (K-quant super-blocks, or Q4_0/Q5_0 blocks)."""
    return kquants.regrid_k(w, blk) if blk.fmt in K_FORMATS else regrid(w, blk)


def dequantize_exact(blk) -> torch.Tensor:
    return kquants.dequantize_k(blk) if blk.fmt in K_FORMATS else dequantize(blk)


def pack_exact(blk) -> torch.Tensor:
    return kquants.pack_k(blk) if blk.fmt in K_FORMATS else pack(blk)


def grid(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """dequantize(quantize(w)) for any exact format: the float32 weights llama.cpp computes with."""
    return dequantize_exact(quantize_exact(w, fmt))


def to_bytes(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The GGUF block bytes of w (R, C) in an exact format: (R, bytes per row) uint8."""
    return pack_exact(quantize_exact(w, fmt))
