"""llama.cpp's K-quants Q4_K and Q6_K in PyTorch, bit for bit.

Reproduces `quantize_row_q4_K_ref` and `quantize_row_q6_K_ref` (ggml-quants.c), which
llama.cpp's quantizer runs when no importance matrix is given, and with `importance` (the
per-column mean squared activation an importance matrix holds) `quantize_row_q4_K_impl` /
`quantize_row_q6_K_impl`, what it runs with one (`llama-quantize --imatrix`): the same float32
operations in the same order (ggml-base is built without FMA contraction), sums
accumulated sequentially over the 32 (or 16) values of a sub-block, `nearest_int`
rounding halves to even, fp16 scales rounded to nearest even. Vectorised over all
sub-blocks of a tensor; the candidate scales of each search are tried in order, as in C.

Super-block layouts (QK_K = 256 weights, little-endian):
    Q4_K (144 B): d:f16, dmin:f16, scales:u8[12] (8 six-bit scales + 8 six-bit mins),
                  qs:u8[128] (per 64 weights: low nibble = w[l], high = w[l+32])
                  w = d*sc[j]*q - dmin*m[j],  q in 0..15, j = sub-block of 32
    Q6_K (210 B): ql:u8[128], qh:u8[64], scales:i8[16], d:f16
                  w = d*sc[j]*(q-32),  q in 0..63, j = sub-block of 16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256
_CHUNK = 1 << 15  # sub-blocks per vectorised pass: bounds the (32, n) / (16, n, 18) temporaries


@dataclass
class KBlocks:
    """A K-quantized weight (R, C): codes and the super-block scales."""
    fmt: str            # "q4_k" | "q6_k"
    q: torch.Tensor     # (R, C) int16 codes: 0..15 (q4_k), 0..63 (q6_k)
    sc: torch.Tensor    # (R, C/256, 8) 6-bit scales (q4_k) | (R, C/256, 16) int8 scales (q6_k)
    d: torch.Tensor     # (R, C/256) float16
    m: torch.Tensor | None = None     # (R, C/256, 8) 6-bit mins (q4_k)
    dmin: torch.Tensor | None = None  # (R, C/256) float16 (q4_k)


def f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (adds 1.5*2^23): round half to even, like torch.round."""
    return torch.round(x)


def seq_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis in order, in float32, as a C loop does (torch.sum reorders)."""
    acc = x[0].clone()
    for row in x[1:]:
        acc += row
    return acc


def _super_blocks(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"row length {cols} is not a multiple of {QK_K}: llama.cpp falls back to another type")
    return w.float().reshape(rows, cols // QK_K, QK_K)


# ---------------------------------------------------------------- Q4_K

def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants (use_mad=false) for n sub-blocks at once.
    x, weights: (k, n), the values of a sub-block down a column (so sequential sums
    read contiguous rows). Returns scale (n,), the_min (n,) (>= 0, subtracted), L (k, n)."""
    mn = x.amin(0).clamp(max=0)  # (n,)
    mx = x.amax(0)
    sum_w = seq_sum(weights)
    sum_x = seq_sum(weights * x)
    flat = mx == mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    xm = x - mn  # (k, n)

    iscale = f32(nmax) / span
    scale = f32(1.0) / iscale
    L = nearest_int(iscale * xm).clamp_(0, nmax)
    diff = scale * L + mn - x
    best_error = seq_sum(weights * (diff * diff))

    # The candidates are tried in order and each one starts from the min the last accepted
    # candidate left (C updates `min` inside the loop), so the search is sequential in `is`.
    min_ = mn.clone()
    for step in range(nstep + 1):
        num = (f32(rmin) + f32(rdelta) * f32(step)) + f32(nmax)
        span = torch.where(flat, torch.ones_like(mx), mx - min_)
        Laux = nearest_int((num / span) * (x - min_)).clamp_(0, nmax)  # (k, n)
        wl = weights * Laux
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * Laux), seq_sum(wl.mul_(x))  # (n,)
        D = sum_w * sum_l2 - sum_l * sum_l
        safe_D = torch.where(D > 0, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(pos, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        d = (this_scale * Laux).add_(this_min).sub_(x)
        cur_error = seq_sum(d.mul_(d).mul_(weights))  # w * (d*d): the products commute exactly
        take = (D > 0) & (cur_error < best_error)  # the first strictly better candidate wins
        best_error = torch.where(take, cur_error, best_error)
        scale = torch.where(take, this_scale, scale)
        min_ = torch.where(take, this_min, min_)
        L = torch.where(take, Laux, L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    min_ = torch.where(flat, mn, min_)
    return scale, -min_, L


def _q4_k_sub_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (32, n) sub-blocks down columns -> scale (n,), min (n,), L (32, n)."""
    # torch.sqrt on float32 is not always correctly rounded (1 ulp off); C's sqrtf is
    av_x = (seq_sum(x * x) / f32(32.0)).double().sqrt().float()
    weights = av_x + x.abs()
    return make_qkx2_quants(x, weights, 15, -1.0, 0.1, 20)


def _q4_k_weighted_sub_scales(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor):
    """quantize_row_q4_K_impl's sub-block search: x, qw (32, n), sigma2 (n,) of each sub-block's
    super-block -> scale (n,), min (n,), L (32, n), sum of weights (n,)."""
    weights = qw * (sigma2 + x * x).double().sqrt().float()
    return *make_qkx2_quants(x, weights, 15, -0.9, 0.05, 36), seq_sum(weights)  # make_qkx3_quants, use_mad=false


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qp_quants for n groups at once: x, qw (k, n) (k values of a group down a
    column) -> scale (n,), L (k, n) in 0..nmax: the importance-weighted super-block scale search
    of quantize_row_q4_K_impl, with its coordinate-descent passes over the codes."""
    k = x.shape[0]
    mx = x.amax(0).clamp(min=0)
    dead = mx < f32(1e-15)  # GROUP_MAX_EPS
    safe = torch.where(dead, torch.ones_like(mx), mx)
    iscale = f32(nmax) / safe
    L = nearest_int(iscale * x)
    scale = f32(1.0) / iscale
    diff = x - scale * L
    best = seq_sum(qw * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (f32(0.1) * f32(step) + f32(nmax)) / safe
        scale_is = f32(1.0) / iscale_is
        diff = x - scale_is * nearest_int(iscale_is * x).clamp(max=nmax)
        mse = seq_sum(qw * diff * diff)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, iscale_is, iscale)
    L = nearest_int(iscale * x).clamp(max=nmax)
    sumlx, suml2 = seq_sum(qw * x * L), seq_sum(qw * L * L)
    active = torch.ones_like(mx, dtype=torch.bool)
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(k):  # in order: each accepted change moves the sums the next one sees
            w, xi, li = qw[i], x[i], L[i]
            slx, sl2 = sumlx - w * xi * li, suml2 - w * li * li
            ok = active & (slx > 0) & (sl2 > 0)
            new = nearest_int(xi * sl2 / torch.where(ok, slx, 1)).clamp(max=nmax)
            ok &= new != li
            slx, sl2 = slx + w * xi * new, sl2 + w * new * new
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            L[i] = torch.where(ok, new, li)
            sumlx, suml2 = torch.where(ok, slx, sumlx), torch.where(ok, sl2, suml2)
            changed |= ok
        active &= changed
        if not active.any():
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), 0)
    return torch.where(dead, 0, scale), torch.where(dead[None], 0, L)


def column_weights(importance: torch.Tensor, rows: int, group: int) -> torch.Tensor:
    """(C,) per-column importance -> (group, R * C / group), laid out as the sub-blocks are."""
    return importance.float().reshape(1, -1, group).expand(rows, -1, -1).reshape(-1, group).T.contiguous()


def quantize_q4_k(w: torch.Tensor, importance: torch.Tensor | None = None) -> KBlocks:
    """quantize_row_q4_K_ref, or with `importance` (C,) quantize_row_q4_K_impl. w: (R, C) with
    C % 256 == 0."""
    b = _super_blocks(w)  # (R, nb, 256)
    rows, nb, _ = b.shape
    sub = b.reshape(-1, 32).T.contiguous()  # (32, n)
    if importance is None:
        parts = [_q4_k_sub_scales(sub[:, i:i + _CHUNK]) for i in range(0, sub.shape[1], _CHUNK)]
    else:
        qw = column_weights(importance, rows, 32)
        sq = b.reshape(-1, QK_K).T.contiguous()
        sigma2 = (f32(2.0) * seq_sum(sq * sq) / f32(QK_K)).repeat_interleave(8)  # per super-block, per sub-block
        parts = [_q4_k_weighted_sub_scales(sub[:, i:i + _CHUNK], qw[:, i:i + _CHUNK], sigma2[i:i + _CHUNK])
                 for i in range(0, sub.shape[1], _CHUNK)]
    scales = torch.cat([p[0] for p in parts]).reshape(rows, nb, 8)
    mins = torch.cat([p[1] for p in parts]).reshape(rows, nb, 8)
    L = torch.cat([p[2] for p in parts], 1).T.reshape(rows, nb, 8, 32)

    if importance is None:
        # C keeps the running max from +0.0 with `>`: a -0.0 min never replaces it
        max_scale = torch.where(scales.amax(-1) > 0, scales.amax(-1), 0.0)  # (R, nb)
        max_min = torch.where(mins.amax(-1) > 0, mins.amax(-1), 0.0)
        inv_scale = torch.where(max_scale > 0, f32(63.0) / torch.where(max_scale > 0, max_scale, 1), 0)
        inv_min = torch.where(max_min > 0, f32(63.0) / torch.where(max_min > 0, max_min, 1), 0)
        # C stores nearest_int into a uint8_t, then MIN(63)
        ls = torch.remainder(nearest_int(inv_scale[..., None] * scales), 256).clamp(max=63)
        lm = torch.remainder(nearest_int(inv_min[..., None] * mins), 256).clamp(max=63)
        d = (max_scale / f32(63.0)).half()
        dmin = (max_min / f32(63.0)).half()
    else:  # both super-block scales searched, weighted by each sub-block's summed weights
        sw = torch.cat([p[3] for p in parts]).reshape(-1, 8).T
        d, ls = make_qp_quants(scales.reshape(-1, 8).T.contiguous(), 63, sw)
        dmin, lm = make_qp_quants(mins.reshape(-1, 8).T.contiguous(), 63, sw)
        d, dmin = d.reshape(rows, nb).half(), dmin.reshape(rows, nb).half()
        # stored as uint8 (a negative code would wrap; the searches' scales and mins are >= 0)
        ls, lm = torch.remainder(ls.T.reshape(rows, nb, 8), 256), torch.remainder(lm.T.reshape(rows, nb, 8), 256)

    dd = d.float()[..., None] * ls  # (R, nb, 8)
    dm = dmin.float()[..., None] * lm
    live = dd != 0
    requant = nearest_int((b.reshape(rows, nb, 8, 32) + dm[..., None]) / torch.where(live, dd, 1)[..., None]).clamp(0, 15)
    L = torch.where(live[..., None], requant, L)
    return KBlocks("q4_k", L.reshape(w.shape).to(torch.int16), ls.to(torch.int16), d,
                   lm.to(torch.int16), dmin)


# ---------------------------------------------------------------- Q6_K

def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(rmse_type=1) for n sub-blocks: x (k, n) down columns, `weights`
    (k, n) the importance ones (`qw`), else x*x as without. Returns scale (n,) and L (k, n) in
    0..2*nmax-1."""
    mx = x.gather(0, x.abs().argmax(0, keepdim=True))[0]  # signed value of largest magnitude
    zero = mx.abs() < f32(1e-15)
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x if weights is None else weights
    wx = (w * x)[..., None]  # as C evaluates w*x[i]*l
    ww = w[..., None]

    def trial(iscale):  # iscale (n, S) -> codes (k, n, S), sumlx, suml2 (n, S)
        l = nearest_int(iscale * x[..., None]).clamp_(-nmax, nmax - 1)
        return l, seq_sum(wx * l), seq_sum(ww * l * l)

    l0, sumlx, suml2 = trial((f32(-nmax) / mx_safe)[:, None])
    l0, sumlx, suml2 = l0[..., 0], sumlx[:, 0], suml2[:, 0]
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1), 0)
    best = scale * sumlx
    steps = torch.tensor([s for s in range(-9, 10) if s], dtype=torch.float32, device=x.device)
    ls, lx, l2 = trial(-(f32(nmax) + f32(0.1) * steps) / mx_safe[:, None])
    L = l0
    for s in range(steps.numel()):
        take = (l2[:, s] > 0) & (lx[:, s] * lx[:, s] > best * l2[:, s])
        scale = torch.where(take, lx[:, s] / torch.where(take, l2[:, s], 1), scale)
        best = torch.where(take, scale * lx[:, s], best)
        L = torch.where(take, ls[..., s], L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    return scale, L


def quantize_q6_k(w: torch.Tensor, importance: torch.Tensor | None = None) -> KBlocks:
    """quantize_row_q6_K_ref, or with `importance` (C,) quantize_row_q6_K_impl (whose sub-block
    search weights each value by its column's importance alone). w: (R, C) with C % 256 == 0."""
    b = _super_blocks(w)
    rows, nb, _ = b.shape
    sub = b.reshape(-1, 16).T.contiguous()  # (16, n)
    qw = None if importance is None else column_weights(importance, rows, 16)
    parts = [make_qx_quants(sub[:, i:i + _CHUNK], 32, None if qw is None else qw[:, i:i + _CHUNK])
             for i in range(0, sub.shape[1], _CHUNK)]
    scales = torch.cat([p[0] for p in parts]).reshape(rows, nb, 16)
    L = torch.cat([p[1] for p in parts], 1).T.reshape(rows, nb, 16, 16)

    max_scale = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))[..., 0]  # (R, nb)
    dead = max_scale.abs() < f32(1e-15)
    iscale = f32(-128.0) / torch.where(dead, 1, max_scale)
    d = torch.where(dead, 0, f32(1.0) / iscale).half()
    sc = nearest_int(iscale[..., None] * scales).clamp(max=127)
    sc = torch.where(dead[..., None], 0, sc)
    dd = d.float()[..., None] * sc  # (R, nb, 16)
    live = dd != 0
    requant = nearest_int(b.reshape(rows, nb, 16, 16) / torch.where(live, dd, 1)[..., None]).clamp(-32, 31) + 32
    L = torch.where(live[..., None], requant, L)
    L = torch.where(dead[..., None, None], 0, L)
    return KBlocks("q6_k", L.reshape(w.shape).to(torch.int16), sc.to(torch.int16), d)


# ---------------------------------------------------------------- decode and pack

def dequantize_k(blk: KBlocks) -> torch.Tensor:
    """dequantize_row_q4_K / dequantize_row_q6_K: (R, C) float32."""
    rows, cols = blk.q.shape
    nb = cols // QK_K
    if blk.fmt == "q4_k":
        q = blk.q.float().reshape(rows, nb, 8, 32)
        d1 = blk.d.float()[..., None] * blk.sc.float()  # (R, nb, 8)
        m1 = blk.dmin.float()[..., None] * blk.m.float()
        return (d1[..., None] * q - m1[..., None]).reshape(rows, cols)
    q = blk.q.float().reshape(rows, nb, 16, 16) - 32
    d1 = blk.d.float()[..., None] * blk.sc.float()
    return (d1[..., None] * q).reshape(rows, cols)


def regrid_k(w: torch.Tensor, blk: KBlocks) -> torch.Tensor:
    """The grid of `w` on `blk`'s scales: the codes re-rounded as the quantizer's last pass
    rounds them, the scales and mins kept. Equal to dequantize_k(quantize_k(w)) when `blk`
    is quantize_k(w); for weights that moved a little since, a point of the same format
    without the scale search (QAT between two searches). (R, C) float32."""
    rows, cols = w.shape
    nb = cols // QK_K
    if blk.fmt == "q4_k":
        dd = blk.d.float()[..., None] * blk.sc.float()  # (R, nb, 8)
        dm = blk.dmin.float()[..., None] * blk.m.float()
        live = (dd != 0)[..., None]
        q = nearest_int((w.float().reshape(rows, nb, 8, 32) + dm[..., None]) / torch.where(live, dd[..., None], 1))
        # + 0.0: a code rounded from a small negative value is -0.0, the stored code's is +0.0
        q = torch.where(live, q.clamp(0, 15) + 0.0, blk.q.float().reshape(rows, nb, 8, 32))  # dead: the stored codes
        return (dd[..., None] * q - dm[..., None]).reshape(rows, cols)
    dd = blk.d.float()[..., None] * blk.sc.float()  # (R, nb, 16)
    live = (dd != 0)[..., None]
    q = nearest_int(w.float().reshape(rows, nb, 16, 16) / torch.where(live, dd[..., None], 1)).clamp(-32, 31)
    q = torch.where(live, q + 0.0, blk.q.float().reshape(rows, nb, 16, 16) - 32)
    return (dd[..., None] * q).reshape(rows, cols)


def quantize_k(w: torch.Tensor, fmt: str, importance: torch.Tensor | None = None) -> KBlocks:
    return {"q4_k": quantize_q4_k, "q6_k": quantize_q6_k}[fmt](w, importance)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(*x.shape, 2)


def pack_k(blk: KBlocks) -> torch.Tensor:
    """The GGUF bytes: (R, C/256 * block_bytes) uint8."""
    rows, cols = blk.q.shape
    nb = cols // QK_K
    if blk.fmt == "q4_k":
        ls, lm = blk.sc.to(torch.uint8), blk.m.to(torch.uint8)  # (R, nb, 8)
        scales = torch.zeros(rows, nb, 12, dtype=torch.uint8)
        scales[..., 0:4] = ls[..., :4] | ((ls[..., 4:] >> 4) << 6)
        scales[..., 4:8] = lm[..., :4] | ((lm[..., 4:] >> 4) << 6)
        scales[..., 8:12] = (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)
        q = blk.q.to(torch.uint8).reshape(rows, nb, 4, 2, 32)  # per 64: [low 32 | high 32]
        qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, nb, 128)
        body = [_f16_bytes(blk.d), _f16_bytes(blk.dmin), scales, qs]
    elif blk.fmt == "q6_k":
        q = blk.q.to(torch.uint8).reshape(rows, nb, 2, 4, 32)  # per 128: four runs of 32
        ql = torch.cat([(q[..., 0, :] & 0xF) | ((q[..., 2, :] & 0xF) << 4),
                        (q[..., 1, :] & 0xF) | ((q[..., 3, :] & 0xF) << 4)], -1).reshape(rows, nb, 128)
        qh = ((q[..., 0, :] >> 4) | ((q[..., 1, :] >> 4) << 2) | ((q[..., 2, :] >> 4) << 4)
              | ((q[..., 3, :] >> 4) << 6)).reshape(rows, nb, 64)
        body = [ql, qh, blk.sc.to(torch.int8).view(torch.uint8), _f16_bytes(blk.d)]
    else:
        raise ValueError(f"not a K-quant: {blk.fmt}")
    return torch.cat(body, -1).reshape(rows, -1)
