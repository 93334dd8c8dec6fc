"""The KD training loop: frozen teacher, chunked loss, exact resume, NaN guard.

Memory: neither model's (B, T, V) logits are ever held whole. Both trunks return hidden
states (B, T, H); the loss walks over position chunks, projecting each chunk through the
output heads and computing its gradient on the spot (`_FusedHeadKD`). Peak logits memory
is a few chunk x V floats, whatever B and T are, with no recomputation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils import parametrize

from edgekit.distill.activations import compact, compact_forwards
from edgekit.distill.hidden import capture
from edgekit.distill.lean import make_optimizer
from edgekit.distill.memory import loss_chunk_rows
from edgekit.distill.precision import autocast, bf16_heads, matmul_precision, resolved_precision
from edgekit.distill.losses import cross_entropy, forward_kl_topk, kd_loss
from edgekit.distill.checkpoint import resume, save_checkpoint
from edgekit.parallel import (StepRoot, average_gradients, fill_from_rank0, is_sharded, mean_scalars, on_meta,
                                      place, return_freed_host_memory, scalar, shard, shard_student, shard_teacher,
                                      train_device, world)
from edgekit.errors import EdgekitError
from edgekit.progress import bar
from edgekit.recipe.schema import TrainSettings


# The trainer's settings are the recipe's, declared once (recipe.schema.TrainSettings); the
# distill and qat stage configs extend it. KDSettings is the name the tests and benchmarks use.
KDSettings = TrainSettings


def compact_modules(student, device: torch.device, precision: str, sharded: bool) -> list:
    """The student's compact forwards for a step (activations.compact_forwards): none under
    FSDP (its hooks gather the weights); under bf16 autocast only the tied embedding's sparse
    gradient (the compact MLP and norm Functions run their own fp32 matmuls)."""
    if sharded:
        return []
    return compact_forwards(student, modules=resolved_precision(device, precision) != "bf16")


def hidden_and_head(model):
    """(trunk returning last hidden states, output projection, logit soft-cap or None)."""
    return model.get_decoder(), model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


class _FusedHeadKD(torch.autograd.Function):
    """Output projection + KD/CE loss, one chunk of positions at a time, gradients included.

    Forward walks the chunks: logits (C, V) = h @ W^T, the loss, and its gradient with
    respect to those logits; then grad_h = g @ W and grad_W += g^T @ h, and the chunk's
    logits are freed. Backward only scales the stored gradients, in place (and, when the
    caller allows, puts the head's into its weight's .grad itself: _owns_grad). Three matmuls per
    chunk as plain autograd does, no recomputation, and peak logits memory of a few chunks
    (the fused linear + loss idea of Liger-Kernel's FLCE). Forward KL and CE, the default
    losses, take a closed-form gradient computed in place (`_forward_kl_grad`: three (C, V)
    buffers, reused by every chunk); the other losses differentiate the chunk with autograd.
    `head` does the student head's matmuls: HeadMatmuls (fp32) or Bf16HeadMatmuls (bf16 operands).
    """

    @staticmethod
    def forward(ctx, s_h, w, t_h, t_logits, t_lp, t_ix, labels, st, s_cap, t_cap, t_bias, into_grad, head):
        n = max(1, int((labels != -100).sum()))
        grad_h = torch.empty_like(s_h)
        total = ce_sum = kd_sum = 0.0
        chunk = head.chunk
        fast = _closed_form(st, s_cap, t_lp)
        temp = st.temperature if t_h is not None else 1.0
        # a soft-capped (or biased) teacher head is divided by T after the cap, not through its input
        t_div_after = t_cap is not None or t_bias
        # (C, V) buffers made once and reused by every chunk: a fresh 100 MB+ tensor per chunk
        # costs its page faults again each time (glibc maps such sizes anew). Student logits,
        # teacher logits, scratch; without a teacher only the first (CE needs no scratch).
        rows = min(chunk, s_h.shape[0])
        bufs = [s_h.new_empty(rows, w.shape[0]) for _ in range(3 if t_h is not None else 1)] if fast else None
        if fast and t_h is not None:  # the scratch is free whenever the heads multiply
            head.lend(bufs[-1])
        for i in range(0, s_h.shape[0], chunk):
            sl = slice(i, i + chunk)
            h, lab = s_h[sl], labels[sl]
            c = h.shape[0]
            scale = 1.0
            if fast:  # both models' logits / T straight from the matmuls: no pass over (C, V) to divide
                u = head.logits(h, 1 / temp, bufs[0][:c])
                t = t_logits(t_h[sl] if t_div_after else t_h[sl] * (1 / temp), bufs[1][:c]) if t_h is not None else None
                if t is not None and t_div_after:
                    t = _softcap(t, t_cap).div_(temp)
                g, scale, loss, ce, kd = _forward_kl_grad(u, t, lab, st, bufs[-1][:c])
            else:
                t = _softcap(t_logits(t_h[sl], None), t_cap) if t_h is not None else None
                g, loss, ce, kd = _autograd_grad(head.logits(h, 1.0, None), t, t_lp, t_ix, sl, lab, st, s_cap)
            del t
            head.backprop(g, h, scale, grad_h[sl])
            total, ce_sum, kd_sum = total + loss, ce_sum + ce, kd_sum + kd
        del bufs
        ctx.save_for_backward(grad_h.div_(n), head.weight_grad().div_(n))
        ctx.head = w if into_grad and _owns_grad(w) else None
        out = torch.tensor([total / n, ce_sum / n, kd_sum / n])
        ctx.mark_non_differentiable(out)
        return torch.tensor(total / n, device=s_h.device), out

    @staticmethod
    def backward(ctx, g_loss, _g_parts):
        grad_h, grad_w = ctx.saved_tensors
        if float(g_loss) != 1.0:  # in place: no second (V, H) buffer beside the one autograd takes
            grad_h.mul_(g_loss)
            grad_w.mul_(g_loss)
        if ctx.head is not None:  # straight into .grad (see _owns_grad); autograd gets nothing to add
            w, ctx.head = ctx.head, None
            if w.grad is None:
                w.grad = grad_w
            else:
                w.grad.add_(grad_w)
            grad_w = None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None, None


def _closed_form(st: KDSettings, s_cap, t_lp) -> bool:
    """Whether the fused loss takes _forward_kl_grad's closed-form gradient (the default losses)."""
    return s_cap is None and t_lp is None and st.loss == "forward_kl"


class HeadMatmuls:
    """The fused loss's matmuls with the student's output head W (V, H), chunk by chunk: the
    logits h @ W^T, then the gradients g @ W (for h) and g^T @ h (summed into W's), fp32."""

    def __init__(self, w: torch.Tensor, chunk: int, positions: int):
        self.w, self.chunk = w, chunk  # `positions` (the call's count) bounds a chunk's rows
        self.grad_w = torch.zeros_like(w)

    def lend(self, buf: torch.Tensor) -> None:
        """A contiguous fp32 (C, V) buffer the matmuls may overwrite (fp32 ones need none)."""

    def logits(self, h, alpha: float, out: torch.Tensor | None) -> torch.Tensor:
        """alpha * h @ W^T (C, V), into `out` when given."""
        if out is None:
            return h @ self.w.T if alpha == 1.0 else torch.mm(h, self.w.T).mul_(alpha)
        return torch.addmm(out, h, self.w.T, beta=0, alpha=alpha, out=out)

    def backprop(self, g, h, scale: float, grad_h: torch.Tensor) -> None:
        """grad_h = scale * g @ W; W's gradient += scale * g^T @ h."""
        torch.mm(g, self.w, out=grad_h)  # (C, H)
        if scale != 1.0:
            grad_h.mul_(scale)
        self.grad_w.addmm_(g.T, h, alpha=scale)  # (V, H)

    def weight_grad(self) -> torch.Tensor:
        return self.grad_w


class Bf16HeadMatmuls(HeadMatmuls):
    """The same matmuls on bf16 inputs (precision: bf16), each accumulating in fp32 inside the
    kernel: W (and an fp32 teacher head: `teacher`) is copied to bf16 once per call, the logits
    come out in bf16 and are widened into the fp32 buffers where the loss and its gradient are
    computed, the gradient (C, V) is rounded to bf16 for its two matmuls, and W's gradient is
    summed over chunks in bf16, widened into fp32 every FLUSH chunks and at the end. The bf16 copy
    of W and that sum are the two halves of the fp32 (V, H) buffer that becomes W's gradient
    (widened in place at the end), and the bf16 (C, V) products pass through the first half of a
    lent fp32 buffer (`lend`: the loss's scratch, free at those moments): memory beyond the fp32
    path's is the teacher head's bf16 copy. At Gemma 3's head (262k x 640) on a 2-core Zen 4 with
    AVX-512 BF16, a 128-position chunk's four matmuls took ~0.55 s against ~1.0 s with oneDNN's fp32
    kernel (the fp32 gradient's read-modify-write of (V, H) alone 0.25 s, bf16's 0.11 s)."""

    FLUSH = 16  # chunks summed in bf16 between fp32 sums: rounding stays ~1e-3 of the total's scale

    def __init__(self, w: torch.Tensor, chunk: int, positions: int):
        self.chunk, self.positions = chunk, positions
        self.grad_w = w.new_empty(w.shape, dtype=torch.float32)
        halves = self.grad_w.view(-1).view(torch.bfloat16)
        self.acc = halves[: w.numel()].view(w.shape).zero_()
        self.w = halves[w.numel():].view(w.shape).copy_(w.detach())
        self.partial, self.pending, self.scratch, self.teacher_w = None, 0, None, None

    def lend(self, buf: torch.Tensor) -> None:
        self.scratch = buf

    def stage(self, rows: int) -> torch.Tensor:
        """A (rows, V) bf16 view of the lent buffer's first half (its own buffer if none was lent)."""
        if self.scratch is None:
            self.scratch = self.grad_w.new_empty(min(self.chunk, self.positions), self.w.shape[0])
        return self.scratch.view(-1).view(torch.bfloat16)[: rows * self.w.shape[0]].view(rows, -1)

    def teacher(self, w: torch.Tensor):
        """The teacher's logits function (teacher_logits_fn's) for a plain head of weight `w`,
        multiplied in bf16 through this call's stage; the bf16 copy is freed with the rest."""
        self.teacher_w = w if w.dtype == torch.bfloat16 else w.to(torch.bfloat16)
        return lambda h, out: _into(torch.mm(h.to(torch.bfloat16), self.teacher_w.T, out=self.stage(h.shape[0])), out)

    def logits(self, h, alpha: float, out: torch.Tensor | None) -> torch.Tensor:
        hb = (h * alpha if alpha != 1.0 else h).to(torch.bfloat16)
        if out is None:
            return torch.mm(hb, self.w.T).float()
        return out.copy_(torch.mm(hb, self.w.T, out=self.stage(h.shape[0])))

    def backprop(self, g, h, scale: float, grad_h: torch.Tensor) -> None:
        if self.pending == self.FLUSH:  # widen the bf16 sum into an fp32 one, start the next
            self.partial = self.acc.float() if self.partial is None else self.partial.add_(self.acc)
            self.acc.zero_()
            self.pending = 0
        gb = self.stage(g.shape[0]).copy_(g)
        grad_h.copy_(torch.mm(gb, self.w))
        if scale != 1.0:
            grad_h.mul_(scale)
        self.acc.addmm_(gb.T, h.to(torch.bfloat16), alpha=scale)
        self.pending += 1

    def weight_grad(self) -> torch.Tensor:
        self.w = self.scratch = self.teacher_w = None
        _widen_in_place(self.grad_w.view(-1))
        self.acc = None
        if self.partial is not None:
            self.grad_w.add_(self.partial)
            self.partial = None
        return self.grad_w


def _widen_in_place(buf: torch.Tensor) -> None:
    """buf: a flat fp32 tensor whose first half holds len(buf) bf16 values; afterwards it holds
    them as fp32. Copied back to front in halving blocks, so that no block overwrites bf16
    values not yet read: block [a, b) writes bytes [4a, 4b), bf16 values [2a, 2b), all >= b."""
    src = buf.view(torch.bfloat16)
    b = buf.numel()
    while b > 1:
        a = (b + 1) // 2
        buf[a:b].copy_(src[a:b])
        b = a
    if b == 1:
        buf[:1] = src[:1].clone()


def _owns_grad(w: torch.Tensor) -> bool:
    """Whether the fused loss may write the head's gradient into w.grad itself instead of
    handing it to autograd (when its caller asks: a caller of .backward(), not of
    torch.autograd.grad): for a plain leaf weight outside torch.distributed (whose FSDP/DDP
    hooks expect autograd to deliver it). With a tied embedding that saves a (V, H) buffer at the end
    of backward: autograd sums the head's and the embedding's gradients out of place, while the
    embedding's sparse rows (activations.compact_forwards) add into .grad in place."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return w.is_leaf and w.requires_grad and not distributed


def _forward_kl_grad(u, t, lab, st: KDSettings, scratch):
    """Loss and d loss / d logits of one chunk for alpha_ce * CE + (1 - alpha_ce) * T^2 KL(p_t^T || p_s^T),
    in closed form: d CE = softmax(s) - onehot, d T^2 KL = T (softmax(s / T) - p_t^T). `u` (C, V)
    holds the student's logits already divided by T (the matmul scaled them), `t` the teacher's
    divided by T (or None: CE alone). Both are overwritten, as is `scratch` (C, V). Returns
    (g, scale, loss, ce, kd): the gradient is scale * g, and g is one of the three buffers (the
    caller folds `scale` into its matmuls). Written for few passes over the (C, V) buffers and no
    new ones, exp above all: at Gemma 3's 262k vocabulary one pass over a 1024-position batch
    takes ~0.1 s on 2 cores, one exp ~0.6 s. Two exps (one per softmax) at T = 1 and T = 2 (the
    CE's log-sum-exp at T = 1 is sum(exp(s/T - max)^T): a square at T = 2), three at other T."""
    T, a = (st.temperature, st.alpha_ce) if t is not None else (1.0, 1.0)  # no teacher: CE alone
    valid = lab != -100
    rows = valid.nonzero().squeeze(1)
    u.sub_(u.amax(-1, keepdim=True))  # u = s/T - max(s)/T
    picked = u[rows, lab[rows]]
    z1 = p1 = None
    if T not in (1.0, 2.0):  # the CE (a metric when alpha_ce is 0) needs its own exp at T = 1
        e1 = torch.mul(u, T, out=scratch).exp_()
        z1 = e1.sum(-1, keepdim=True)
        if a > 0:
            p1 = e1 / z1  # CE's gradient term (softmax at T = 1)
    kd, et = 0.0, None
    if t is not None:
        t.sub_(t.amax(-1, keepdim=True))  # v = t/T - max
        et = torch.exp(t, out=scratch)
        zt = et.sum(-1, keepdim=True)
        # sum p_t (v - u): KL = that - log z_t + log z_s (torch.sum's blocked sum: a batched dot
        # would save a pass but summed Gemma 3's 262k terms with 7e-5 relative error)
        dot = t.sub_(u).mul_(et).sum(-1, keepdim=True) / zt
    u.exp_()
    zs = u.sum(-1, keepdim=True)
    if T == 1.0:
        z1 = zs
    elif T == 2.0:
        z1 = torch.linalg.vector_norm(u, dim=-1, keepdim=True).square()
        if a > 0 and et is not None:  # into t's buffer, free since `dot`
            p1 = torch.square(u, out=t).div_(z1)
    ce = float((z1.log().view(-1)[rows] - T * picked).sum())
    u.div_(zs)  # p_s at T
    scale = 1.0
    if et is not None:
        kd = float(((dot - zt.log() + zs.log()).view(-1) * valid).sum()) * T * T
        if T == 1.0:  # one softmax serves both terms: p_s - (1 - a) p_t
            u.addcmul_(et, (a - 1) / zt)
        elif a == 0:  # T (p_s^T - p_t), T folded into the caller's matmuls
            u.addcmul_(et, -1 / zt)
            scale = T
        else:  # (1 - a) T (p_s^T - p_t) + a softmax(s)
            u.addcmul_(et, -1 / zt).mul_((1 - a) * T).add_(p1, alpha=a)
    if a > 0:
        u[rows, lab[rows]] -= a
    if len(rows) < u.shape[0]:
        u[~valid] = 0
    return u, scale, a * ce + (1 - a) * kd, ce, kd


def _autograd_grad(s, t, t_lp, t_ix, sl, lab, st: KDSettings, s_cap):
    """Loss and d loss / d logits of one chunk, any loss, by autograd on the chunk."""
    logits = s.requires_grad_()
    with torch.enable_grad():
        s_logits = _softcap(logits, s_cap)
        ce = cross_entropy(s_logits, lab).sum()
        loss, kd = ce, torch.zeros((), device=s.device)
        if t is not None:
            kd = (kd_loss(st.loss, s_logits, t, st.temperature, st.skew_alpha, st.jsd_beta) * (lab != -100)).sum()
        elif t_lp is not None:  # offline: the teacher's cached top-k at the same temperature
            kd = (forward_kl_topk(s_logits / st.temperature, t_lp[sl], t_ix[sl]) * st.temperature**2
                  * (lab != -100)).sum()
        if t is not None or t_lp is not None:
            loss = st.alpha_ce * ce + (1 - st.alpha_ce) * kd
        (g,) = torch.autograd.grad(loss, logits)  # (C, V)
    return g, float(loss), float(ce), float(kd)


def teacher_logits_fn(head, bf16: Bf16HeadMatmuls | None = None):
    """(h (C, H), out (C, V) or None) -> the teacher's logits: a plain Linear head as one matmul
    on its weight (as it is when FSDP has gathered it), a lean teacher's int8 head through its
    rows, any other head (one with a bias too) as itself. With `bf16` (the student head's
    bf16 matmuls) a plain fp32 or bf16 head multiplies in bf16 too, through its stage."""
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        w = head.weight.detach()
        if bf16 is not None and w.dtype in (torch.float32, torch.bfloat16):
            return bf16.teacher(w)
        if w.dtype != torch.float32:  # an fp16/bf16 teacher: its own dtype's matmul, fp32 logits
            return lambda h, out: _into(torch.mm(h.to(w.dtype), w.T), out)
        return lambda h, out: torch.mm(h, w.T, out=out) if out is not None else h @ w.T
    rows = getattr(head, "rows", None)
    if rows is not None and hasattr(rows, "logits"):
        return lambda h, out: rows.logits(h, out=out)
    return lambda h, out: _into(head(h), out)


def _into(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return out.copy_(x) if out is not None else x.float()


def chunked_loss(s_h, t_h, labels, student, teacher, st: KDSettings, t_sparse=None,
                 head_grad_into_weight: bool = False, bf16_heads: bool = False) -> tuple[torch.Tensor, dict]:
    """Mean loss over trained positions. s_h, t_h: (N, H) hidden states; labels: (N,) next
    tokens, -100 where nothing is trained (chat context, padding): both CE and KD skip those.
    `t_sparse`: the teacher's cached top-k (log-probs (N, k), ids (N, k)) instead of t_h.
    `head_grad_into_weight`: the caller runs .backward() (not torch.autograd.grad), and the
    output head's gradient may go into its weight's .grad directly (see _owns_grad).
    `bf16_heads`: both output heads multiply in bf16 (Bf16HeadMatmuls; the closed-form losses
    only), as `precision: bf16` trains; the loss and its gradient stay fp32."""
    _, s_head, s_cap = hidden_and_head(student)
    t_head, t_cap = (hidden_and_head(teacher)[1:] if teacher is not None else (None, None))
    if getattr(s_head, "bias", None) is not None:
        raise EdgekitError("the student's output layer has a bias; the fused KD loss supports bias-free heads (all llama-family models)",
                           "use a model whose lm_head has no bias")
    t_lp, t_ix = t_sparse if t_sparse is not None else (None, None)
    w = s_head.weight  # a parametrized (fake-quantized) weight is computed once here
    bf16_heads = bf16_heads and _closed_form(st, s_cap, t_lp)
    head = (Bf16HeadMatmuls if bf16_heads else HeadMatmuls)(w, loss_chunk_rows(st.loss_chunk, w.shape[0]), s_h.shape[0])
    t_logits = teacher_logits_fn(t_head, head if bf16_heads else None) if t_head is not None else None
    t_bias = getattr(t_head, "bias", None) is not None
    loss, parts = _FusedHeadKD.apply(s_h, w, t_h, t_logits, t_lp, t_ix, labels, st, s_cap, t_cap, t_bias,
                                      head_grad_into_weight, head)
    return loss, {"ce": float(parts[1]), "kd": float(parts[2])}


def batch_indices(n_rows: int, batch: int, seed: int, step: int, micro: int) -> torch.Tensor:
    """Rows for one micro-batch, a pure function of (seed, step, micro): resume is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + micro)
    return torch.randint(0, n_rows, (batch,), generator=g)


def is_on_policy(st: KDSettings, step: int, micro: int) -> bool:
    if st.on_policy_fraction <= 0:
        return False
    g = torch.Generator().manual_seed(st.seed * 65_537 + step * 11 + micro)
    return bool(torch.rand((), generator=g) < st.on_policy_fraction)


def lr_at(step: int, st: KDSettings) -> float:
    if step < st.warmup_steps:
        return st.lr * (step + 1) / st.warmup_steps
    progress = (step - st.warmup_steps) / max(1, st.steps - st.warmup_steps)
    return st.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def on_policy_batch(student, x: torch.Tensor, st: KDSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GKD's on-policy data: the student continues the first half of each row by sampling.
    Returns ids (B, T) and a mask (B, T) that is True only on the generated tokens."""
    b, t = x.shape
    prompt = t // 2
    torch.manual_seed(seed)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        out = student.generate(input_ids=x[:, :prompt], attention_mask=torch.ones_like(x[:, :prompt]),
                               max_new_tokens=t - prompt, do_sample=True, temperature=st.on_policy_temperature,
                               top_k=0, top_p=1.0, pad_token_id=student.config.eos_token_id or 0)
    student.train(was_training)
    pad = student.config.eos_token_id if student.config.eos_token_id is not None else 0
    ids = torch.full_like(x, pad)
    ids[:, : out.shape[1]] = out[:, :t]
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, prompt: out.shape[1]] = True
    eos = student.config.eos_token_id
    if eos is not None:  # nothing after a sequence's first EOS is trained
        ended = (ids == eos) & mask
        after = torch.cumsum(ended.int(), 1) - ended.int() > 0
        mask &= ~after
    return ids, mask


def train(student, teacher, rows: torch.Tensor, st: TrainSettings, workdir: Path, desc: str = "distill",
          mask: torch.Tensor | None = None, teacher_cache=None, hidden=None, holdout: torch.Tensor | None = None,
          after_step: Callable[[int], None] | None = None) -> dict:
    """Train `student` in place on packed `rows` (N, T). `teacher=None` trains on labels alone,
    or, with `teacher_cache` (logit_cache.TeacherCache of these rows), on the cached top-k.
    `mask` (N, T) bool marks the tokens to train on (default: all). `hidden`
    (hidden.HiddenAlign) adds hidden-state distillation; its projections train alongside.
    With `st.eval_every` and `holdout` rows (N, T), the student is scored on them every
    that many steps and at the end (perplexity; KL to the teacher and top-1 agreement when
    the teacher is online): `{"step", "holdout": {...}}` lines in metrics.jsonl. Scalars
    also go to TensorBoard (workdir/tensorboard) when it is installed. `after_step(step)` runs
    on rank 0 after each optimizer step (step counted from 1), e.g. to keep snapshots."""
    torch.manual_seed(st.seed)
    rank, size = world()
    if st.batch_size % size:
        raise EdgekitError(f"batch_size {st.batch_size} does not split over {size} processes",
                           f"use a batch_size divisible by {size} (each process takes batch_size/{size} rows)")
    if hidden is not None and teacher is None:
        raise EdgekitError("hidden-state distillation needs the teacher online",
                           "remove hidden_states, or use teacher_logits: online with a same-vocabulary student")
    device = train_device()
    root = setup_models(student, teacher, hidden, st, device, rank, size)
    params = [p for p in root.parameters() if p.requires_grad]
    opt = make_optimizer(param_groups(params), st.optimizer, st.lr, st.weight_decay, fused=not is_sharded(root))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "checkpoint"
    start = resume(ckpt, root, opt, rank, size)
    step_fn = StepFn(root, student, teacher, hidden, teacher_cache, rows, mask, st, device, rank, size)
    hooks = Hooks(workdir, desc, st, rank, size, start, holdout)
    last = {}
    try:
        for step in range(start, st.steps):
            t0 = time.perf_counter()
            parts, grad_norm = step_fn.optimizer_step(opt, params, step, desc, ckpt)
            last = {"step": step + 1, **{k: round(v, 5) for k, v in parts.items()}, "lr": lr_at(step, st),
                    "grad_norm": round(grad_norm, 4),
                    "tokens_per_s": round(step_fn.tokens_per_step / (time.perf_counter() - t0), 1)}
            last = hooks.after_step(last, root, teacher, device)
            if after_step is not None and rank == 0:
                after_step(step + 1)
            if (step + 1) % st.checkpoint_every == 0 and step + 1 < st.steps:
                save_checkpoint(ckpt, root, opt, step + 1, rank, size)
    finally:
        hooks.close()
    student.eval()
    if device.type != "cpu":  # later stages (export, evaluation) read the models on the CPU
        root.to("cpu")
        place(teacher, torch.device("cpu"))
    return last


def setup_models(student, teacher, hidden, st: TrainSettings, device: torch.device, rank: int, size: int):
    """Put the models where they train: sharded (FSDP2) or whole on the device; returns the
    root module the optimizer trains (the student and any hidden-state projections)."""
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()
    root = StepRoot(student, hidden)  # what the optimizer trains, under one name space
    if size > 1 and device.type == "cpu" and (st.shard_student or st.shard_teacher):
        return_freed_host_memory()
    # sharded models are sharded before they move: FSDP moves each layer's shard to the device
    # as it shards it, so no GPU ever holds a whole model. Processes that built them on the
    # meta device (parallel.skeleton) then receive rank 0's values.
    skeletons = size > 1 and mean_scalars({"meta": float(on_meta(root) or on_meta(teacher))}, size)["meta"] > 0
    whole = ({"root": root.state_dict(), "teacher": teacher.state_dict() if teacher is not None else None}
             if skeletons and rank == 0 else {})
    if size > 1 and st.shard_student:
        shard_student(root)
    else:
        root.to(device)
    if size > 1 and st.shard_teacher and teacher is not None:
        shard_teacher(teacher, device)
    else:
        place(teacher, device)
    if skeletons:
        fill_from_rank0(root, whole.get("root"), device)
        if teacher is not None:
            fill_from_rank0(teacher, whole.get("teacher"), device)
    return root


class StepFn:
    """One optimizer step: micro-batches (on-policy samples when due), the fused KD loss,
    hidden-state loss, NaN guard, gradient averaging and clipping."""

    def __init__(self, root, student, teacher, hidden, teacher_cache, rows, mask, st: TrainSettings, device, rank, size):
        self.root, self.student, self.teacher, self.hidden, self.cache = root, student, teacher, hidden, teacher_cache
        self.rows, self.mask, self.st, self.device, self.rank, self.size = rows, mask, st, device, rank, size
        self.trunk_s = hidden_and_head(student)[0]
        self.trunk_t = hidden_and_head(teacher)[0] if teacher is not None else None
        # the student's gated MLPs and RMSNorms save fewer activations (activations.py)
        self.compact = compact_modules(student, device, st.precision, is_sharded(root))
        self.tokens_per_step = st.batch_size * st.grad_accum * (rows.shape[1] - 1)

    def optimizer_step(self, opt, params: list, step: int, desc: str, ckpt: Path) -> tuple[dict, float]:
        st = self.st
        for g in opt.param_groups:
            g["lr"] = lr_at(step, st) * g.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        parts = {"loss": 0.0, "ce": 0.0, "kd": 0.0} | ({"hidden": 0.0} if self.hidden is not None else {})
        for micro in range(st.grad_accum):
            # parametrized (fake-quantized) weights are computed once per micro-step, not once per
            # use: the chunked loss reads the output head in every chunk and again in backward
            with parametrize.cached(), matmul_precision(self.device, st.precision):
                loss, p = self.micro_batch(step, micro)
                if mean_scalars({"bad": float(not torch.isfinite(loss.detach()))}, self.size)["bad"] > 0:
                    raise EdgekitError(
                        f"{desc}: the loss became {float(loss.detach())} at step {step}; the last good checkpoint is kept in {ckpt}",
                        "lower the learning rate (lr), raise warmup_steps, or check the data for empty or broken rows")
                (loss / st.grad_accum).backward()
                p["loss"] = float(loss.detach())
                for k in parts:
                    parts[k] += p[k] / st.grad_accum
        if not is_sharded(self.root):  # FSDP has averaged (reduce-scattered) them already
            average_gradients(params, self.size)
        parts = mean_scalars(parts, self.size)
        grad_norm = scalar(torch.nn.utils.clip_grad_norm_(params, st.grad_clip))
        if not math.isfinite(grad_norm):
            raise EdgekitError(f"{desc}: gradients became {grad_norm} at step {step}; the last good checkpoint is kept in {ckpt}",
                               "lower the learning rate (lr) or raise grad_clip's strictness")
        opt.step()
        return parts, grad_norm

    def micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        st = self.st
        idx = shard(batch_indices(self.rows.shape[0], st.batch_size, st.seed, step, micro), self.rank, self.size)
        x = self.rows[idx].to(self.device)  # (B, T)
        m = self.mask[idx].to(self.device) if self.mask is not None else torch.ones_like(x, dtype=torch.bool)
        if self.teacher is not None and is_on_policy(st, step, micro):
            seed = st.seed * 7919 + step * 31 + micro
            x, m = self.root(lambda: on_policy_batch(self.student, x, st, seed))  # sharded: the root gathers its part
        labels = torch.where(m[:, 1:], x[:, 1:], -100).reshape(-1)
        # runs inside the root's forward: under FSDP its parameters are gathered
        return self.root(lambda: self.loss(x[:, :-1], labels, idx))

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        st, hidden, device = self.st, self.hidden, self.device
        with layer_outputs(self.student, hidden, "student") as s_states, autocast(device, st.precision), \
                compact(self.compact):
            s_h = self.trunk_s(input_ids=inputs).last_hidden_state.reshape(labels.numel(), -1)  # (B*(T-1), H)
        t_h = None
        if self.trunk_t is not None:
            with torch.no_grad(), layer_outputs(self.teacher, hidden, "teacher") as t_states, autocast(device, st.precision):
                t_h = self.trunk_t(input_ids=inputs).last_hidden_state.reshape(labels.numel(), -1)
        s_h, t_h = s_h.float(), t_h.float() if t_h is not None else None  # the head and loss in fp32
        t_sparse = self.cache.batch(idx) if self.cache is not None else None
        if t_sparse is not None:
            t_sparse = tuple(t.to(device) for t in t_sparse)
        loss, p = chunked_loss(s_h, t_h, labels, self.student, self.teacher, st, t_sparse, head_grad_into_weight=True,
                               bf16_heads=bf16_heads(device, st.precision))
        if hidden is not None:
            h_loss = hidden.loss(s_states, t_states, labels != -100)
            loss = loss + h_loss
            p["hidden"] = float(h_loss.detach())
        return loss, p


class Hooks:
    """What happens after each step besides training: metrics.jsonl, holdout evaluation,
    TensorBoard, the progress bar. Only rank 0 writes."""

    def __init__(self, workdir: Path, desc: str, st: TrainSettings, rank: int, size: int, start: int, holdout):
        self.desc, self.st, self.holdout = desc, st, holdout
        self.log = (workdir / "metrics.jsonl").open("a") if rank == 0 else open(os.devnull, "w")
        self.tb = tensorboard(workdir) if rank == 0 else None
        self.progress = bar(st.steps, desc if size == 1 else f"{desc} (rank {rank}/{size})", unit="step", disable=rank != 0)
        self.progress.update(start)

    def after_step(self, last: dict, root, teacher, device) -> dict:
        st, step = self.st, last["step"]
        self.log.write(json.dumps(last) + "\n")
        if st.eval_every and self.holdout is not None and (step % st.eval_every == 0 or step == st.steps):
            scores = holdout_scores(root, teacher, self.holdout.to(device))
            self.log.write(json.dumps({"step": step, "holdout": scores}) + "\n")
            last = {**last, "holdout": scores}
        self.log.flush()
        if self.tb is not None:
            for k, v in last.items():
                for name, value in (v.items() if isinstance(v, dict) else [(None, v)]):
                    if k != "step":
                        self.tb.add_scalar(f"{self.desc}/{k}" + (f"/{name}" if name else ""), value, step)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        return last

    def close(self) -> None:
        self.progress.close()
        self.log.close()
        if self.tb is not None:
            self.tb.close()


def param_groups(params: list) -> list[dict]:
    """One optimizer group, plus one per `lr_scale` that parameters carry (QAT's learned
    quantization scales train at their own rate), in a fixed order."""
    groups: dict[float, list] = {}
    for p in params:
        groups.setdefault(getattr(p, "lr_scale", 1.0), []).append(p)
    return [{"params": ps, "lr_scale": scale} for scale, ps in sorted(groups.items(), key=lambda kv: kv[0] != 1.0)]


def tensorboard(workdir: Path):
    """A TensorBoard writer into workdir/tensorboard, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(workdir / "tensorboard"))


def holdout_scores(root, teacher, holdout: torch.Tensor) -> dict:
    """Perplexity of the student (root.student) on holdout rows (N, T), and with a teacher
    KL(teacher || student) and top-1 agreement; the student is back in training mode after.
    Under FSDP every process scores the same rows (the forward gathers layers)."""
    from edgekit.bench.quality import evaluate

    student = root.student
    student.eval()

    @torch.no_grad()
    def score_student(row):
        return root(lambda: student(input_ids=row[None]).logits[0].float())

    @torch.no_grad()
    def score_teacher(row):
        return teacher(input_ids=row[None]).logits[0].float()

    scorers = {"student": score_student} | ({"teacher": score_teacher} if teacher is not None else {})
    pairs = [("student", "teacher")] if teacher is not None else []
    with parametrize.cached():  # a fake-quantized student's grid is computed once for all rows
        result = evaluate(scorers, holdout, pairs, desc="holdout")
    student.train()
    scores = {"ppl": round(result["student"]["ppl"], 4)}
    if teacher is not None:
        scores |= {"kl": round(result["student|teacher"]["kl"], 5), "top1": round(result["student|teacher"]["top1"], 4)}
    return scores


def layer_outputs(model, hidden, side: str):
    """The decoder-layer outputs `hidden` compares, recorded during the block ({} without it)."""
    if hidden is None:
        return contextlib.nullcontext({})
    indices = sorted(set(hidden.layer_map.keys() if side == "student" else hidden.layer_map.values()))
    return capture(model, indices, detach=side == "teacher")
