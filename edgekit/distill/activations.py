"""Fewer saved activations in the student's gated MLPs and RMSNorms, no recomputed matmuls;
no dense gradient for a tied embedding.

A gated MLP, down(act(gate(x)) * up(x)) (Llama, Mistral, Qwen, SmolLM, Gemma...), keeps five
tensors for its backward under plain autograd: x, gate(x), act(gate(x)), up(x) and their
product, four of them (tokens, intermediate) wide. `_GatedMLP` keeps x, gate(x) and up(x) and
recomputes the activation and the product in backward (elementwise, cheap beside the three
matmuls), as Liger-Kernel's fused SwiGLU does on GPUs: two (tokens, intermediate) tensors
fewer per layer. Used around the student's forward in the trainer (`compact`); the
modules are restored on exit, so saved or exported models are untouched.

RMSNorm likewise (`_RMSNorm`): plain autograd keeps the input and the normalised input, both
(tokens, hidden); the compact one keeps the input and one reciprocal RMS per token. Which
variant a norm module is (weight or 1 + weight, as Gemma's) is checked on a random input and
random weights against its own forward before it is replaced; a module that matches neither is left alone.

A tied input embedding (its weight is the output head's: SmolLM2, Gemma, Qwen3's small models)
runs with a sparse gradient, the batch's rows only: the fused loss has written the head's dense
gradient into .grad (trainer._owns_grad), and the rows add into it in place. Plain autograd
instead makes a dense (vocab, hidden) embedding gradient and sums the two into another one:
two (V, H) tensors at the end of backward (Gemma 3: 671 MB each).
"""

from __future__ import annotations

import contextlib
import copy
from functools import partial
from typing import Callable

import torch
from torch import nn

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class _GatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, act):
        g, u = x @ w_gate.T, x @ w_up.T
        out = (act(g) * u) @ w_down.T
        ctx.act = act
        ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        need_x, need_gate, need_up, need_down, _ = ctx.needs_input_grad
        with torch.enable_grad():  # the activation's own derivative, whatever act is (SiLU, GELU-tanh...)
            g_in = g.detach().requires_grad_()
            a_out = ctx.act(g_in)
        a = a_out.detach()
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  (tokens, features)
        grad_down = flat(grad_out).T @ flat(a * u) if need_down else None
        grad_p = grad_out @ w_down  # d out / d (act(g) * u)
        grad_u = grad_p * a
        (grad_g,) = torch.autograd.grad(a_out, g_in, grad_p.mul_(u))
        grad_x = torch.addmm(flat(grad_g) @ w_gate, flat(grad_u), w_up).view_as(x) if need_x else None
        grad_gate = flat(grad_g).T @ flat(x) if need_gate else None
        grad_up = flat(grad_u).T @ flat(x) if need_up else None
        return grad_x, grad_gate, grad_up, grad_down, None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, offset):
        r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        ctx.offset = offset
        ctx.save_for_backward(x, r, w)
        return x * r * (w + offset)

    @staticmethod
    def backward(ctx, grad_out):
        x, r, w = ctx.saved_tensors
        n = x * r
        grad_w = (grad_out * n).reshape(-1, n.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        gn = grad_out * (w + ctx.offset)
        grad_x = (gn - n * (gn * n).mean(-1, keepdim=True)).mul_(r)
        return grad_x, grad_w, None, None


def _norm_offset(m: nn.Module) -> float | None:
    """0 for a norm computing x / rms(x) * weight, 1 for x / rms(x) * (1 + weight) (Gemma), None
    for anything else (checked against the module's own forward on random input and weights)."""
    w, eps = getattr(m, "weight", None), _eps(m)
    if ("RMSNorm" not in type(m).__name__ or not isinstance(w, nn.Parameter) or w.dim() != 1 or w.dtype != torch.float32
            or not isinstance(eps, float) or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__):
        return None
    gen = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(m)  # with random weights: a weight of ones would make 2 * w and 1 + w alike
    x = torch.randn(2, 3, w.shape[0], generator=gen).to(w.device)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(w.shape[0], generator=gen))
        ref = probe(x)
        for offset in (0.0, 1.0):
            if ref.shape == x.shape and torch.allclose(_RMSNorm.apply(x, probe.weight, eps, offset), ref, rtol=1e-5, atol=1e-6):
                return offset
    return None


def _is_gated_mlp(m: nn.Module) -> bool:
    """A module whose forward is down(act(gate(x)) * up(x)) on plain, bias-free, hook-free Linears
    (a fake-quantized, parametrized Linear counts; a bitsandbytes one does not)."""
    if not callable(getattr(m, "act_fn", None)) or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
        return False
    for name in _PROJECTIONS:
        lin = getattr(m, name, None)
        if not isinstance(lin, nn.Linear) or lin.bias is not None or lin._forward_hooks or lin._forward_pre_hooks:
            return False
        if type(lin.weight) not in (nn.Parameter, torch.Tensor) or not lin.weight.is_floating_point():
            return False
    return True


def _mlp_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _GatedMLP.apply(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, m.act_fn)


def _eps(m: nn.Module):
    return getattr(m, "variance_epsilon", getattr(m, "eps", None))  # Llama/Qwen name it one way, Gemma the other


def _norm_forward(m: nn.Module, offset: float, x: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(x, m.weight, _eps(m), offset)


def compact_forwards(model: nn.Module, modules: bool = True) -> list[tuple[nn.Module, Callable]]:
    """(module, its compact forward) for each gated MLP and RMSNorm of `model` that has one
    (unless `modules` is False), and for its input embedding when the output head shares its
    weight (`_is_tied_embedding`)."""
    out = []
    for m in model.modules() if modules else ():
        if _is_gated_mlp(m):
            out.append((m, partial(_mlp_forward, m)))
        elif (offset := _norm_offset(m)) is not None:
            out.append((m, partial(_norm_forward, m, offset)))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if _is_tied_embedding(model, emb):
        out.append((emb, partial(_sparse_embedding_forward, emb)))
    return out


def _is_tied_embedding(model: nn.Module, emb) -> bool:
    """A plain nn.Embedding (or subclass, as Gemma's scaled one) whose weight is the output
    head's, not parametrized, hook-free, not sparse already."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (isinstance(emb, nn.Embedding) and head is not None and type(emb.weight) is nn.Parameter
            and emb.weight is getattr(head, "weight", None) and not emb.sparse
            and not (emb._forward_hooks or emb._forward_pre_hooks or "forward" in emb.__dict__))


def _sparse_embedding_forward(m: nn.Embedding, *args, **kwargs) -> torch.Tensor:
    """The module's own forward with a sparse gradient: the batch's rows only, not a dense
    (vocab, hidden) tensor (Gemma 3: 671 MB). The fused loss has written the head's dense
    gradient into .grad by then (trainer._owns_grad), and sparse rows add into it in place;
    without that, autograd sums both into a new dense tensor, as it does for dense ones."""
    m.sparse = True
    try:
        return type(m).forward(m, *args, **kwargs)
    finally:
        m.sparse = False


@contextlib.contextmanager
def compact(forwards: list[tuple[nn.Module, Callable]]):
    """Within the block, each module runs its compact forward (from compact_forwards)."""
    for m, fn in forwards:
        m.forward = fn
    try:
        yield
    finally:
        for m, _ in forwards:
            m.__dict__.pop("forward", None)
