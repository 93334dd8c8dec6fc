"""GPTQ (Frantar et al., 2023) against llama.cpp's own grid, so a GGUF keeps its benefit.

llama.cpp's converter cannot carry a GPTQ checkpoint into GGUF: it dequantizes the int4
groups and quantizes again onto its own grid, which throws the error compensation away.
Here the compensation is run against the GGUF format itself. Columns (input features) are
quantized left to right; when a column starts a llama.cpp block (32 weights, or a
256-weight super-block for K-quants) the block's scales are fitted by the exact quantizer
(`ggml_blocks` / `kquants`) to the weights as GPTQ has updated them so far, and every
column of the block is then rounded onto that fixed grid, its error spread over the
columns not yet quantized through the inverse Hessian of the layer's inputs. The codes and
scales are packed as they are: no second quantization between GPTQ and the file.

Every exact format decodes as  w = s * (q - o) + m  per row and sub-block (`affine`), which
is all the loop needs to know about it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from tqdm import tqdm

from edgekit.formats import ggml_blocks, kquants
from edgekit.formats.ggml_blocks import K_FORMATS, quantize_exact


def affine(blk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Per-weight (s, o, m) and the code range of a quantized block: w = s*(q - o) + m."""
    rows, cols = blk.q.shape
    fmt = blk.fmt
    if fmt == "q4_k":
        d1 = blk.d.float()[..., None] * blk.sc.float()  # (R, nb, 8)
        m1 = blk.dmin.float()[..., None] * blk.m.float()
        s, m, o, lo, hi = d1.repeat_interleave(32, -1), -m1.repeat_interleave(32, -1), 0, 0, 15
    elif fmt == "q6_k":
        d1 = blk.d.float()[..., None] * blk.sc.float()  # (R, nb, 16)
        s, m, o, lo, hi = d1.repeat_interleave(16, -1), torch.zeros(1), 32, 0, 63
    else:
        d = blk.d.float().repeat_interleave(ggml_blocks.BLOCK, -1)
        m = blk.m.float().repeat_interleave(ggml_blocks.BLOCK, -1) if blk.m is not None else torch.zeros(1)
        o, lo, hi = {"q8_0": (0, -128, 127), "q4_0": (8, 0, 15), "q5_0": (16, 0, 31), "q4_1": (0, 0, 15)}[fmt]
        s = d
    s = s.reshape(rows, cols)
    m = m.reshape(rows, cols) if m.numel() > 1 else torch.zeros(rows, cols)
    return s, torch.tensor(float(o)), m, lo, hi


def concat(blocks: list):
    """Join blocks quantized over consecutive column ranges into one (their scales are per block)."""
    first = blocks[0]
    fields = {"q": torch.cat([b.q for b in blocks], 1), "d": torch.cat([b.d for b in blocks], 1)}
    for name in ("sc", "m", "dmin"):
        if getattr(first, name, None) is not None:
            fields[name] = torch.cat([getattr(b, name) for b in blocks], 1)
    return replace(first, **fields)


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of H^-1 after dampening; and the columns no input ever reached."""
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(5):  # a (numerically) indefinite H gets more dampening, as reference GPTQ code does
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(hinv, upper=True).float(), dead
        except torch.linalg.LinAlgError:
            h += 0.1 * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    raise ValueError("the layer's input Hessian is not positive definite even after dampening; "
                     "calibrate on more rows or raise quantize.damp")


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: str, damp: float = 0.01):
    """Quantize w (out, in) to llama.cpp format `fmt`, minimising ||(W - Q) X||² for inputs
    with Hessian h = 2 XᵀX / n. Returns the format's blocks (codes + scales), ready to pack."""
    group = kquants.QK_K if fmt in K_FORMATS else ggml_blocks.BLOCK
    lazy = group if fmt in K_FORMATS else 4 * group  # lazy-update span: whole groups, so the
    rows, cols = w.shape                              # group's scales see its updated weights
    if cols % group:
        raise ValueError(f"row length {cols} is not a multiple of {group} ({fmt})")
    u, dead = inverse_hessian_factor(h, damp)
    work = w.detach().float().clone()
    work[:, dead] = 0
    blocks = []
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        w1, u1 = work[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if i % group == 0:
                blk = quantize_exact(w1[:, i:i + group], fmt)
                s, o, m, lo, hi = affine(blk)
                codes = blk.q.clone()
                blocks.append((blk, codes))
            j = i % group
            col = w1[:, i]
            safe = torch.where(s[:, j] == 0, torch.ones_like(s[:, j]), s[:, j])
            q = (torch.round((col - m[:, j]) / safe) + o).clamp(lo, hi)
            q = torch.where(s[:, j] == 0, blk.q[:, j].float(), q)  # a zero scale: any code decodes to m
            codes[:, j] = q.to(codes.dtype)
            err = (col - (s[:, j] * (q - o) + m[:, j])) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        work[:, i2:] -= err1 @ u[i1:i2, i2:]
    return concat([replace(blk, q=codes) for blk, codes in blocks])


@torch.no_grad()
def input_hessians(model: nn.Module, rows: torch.Tensor, names: list[str], batch_size: int = 4,
                   desc: str = "calibrating") -> dict[str, torch.Tensor]:
    """H = 2 XᵀX / n of the inputs X of each named nn.Linear, over every token of `rows`."""
    modules = dict(model.named_modules())
    hs = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            hs[name] += x.T @ x
            counts[name] += x.shape[0]
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        model.eval()
        for start in tqdm(range(0, rows.shape[0], batch_size), desc=desc, unit="batch"):
            model(input_ids=rows[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {n: (2.0 * hs[n] / max(counts[n], 1)).float() for n in names}
