"""llama.cpp's activation rounding, in PyTorch: what its CPU matmuls do to their inputs.

Before ggml multiplies a quantized weight, it rounds each input row to the weight type's
8-bit "vec_dot" format and multiplies integers:

- Q4_0, Q5_0, Q8_0 weights: Q8_0 blocks of 32 values, scale max|x|/127 kept as fp16,
  codes round(x * 127/max|x|) (halves to even, as x86's `_mm256_round_ps`);
- Q4_1 weights: Q8_1, the same codes and fp16 scale; its block sum, which multiplies the
  weight's offsets, is stored as fp16 too. That rounding depends on the weight's side and is
  not reproduced, so Q4_1 layers match ggml ~10x better than float inputs, not exactly;
- Q4_K, Q6_K weights: Q8_K blocks of 256 values, scale -max/127 (max: the value of largest
  magnitude, sign kept) kept in fp32, codes clamped to 127.

`round_activations(x, fmt)` reproduces this (tests compare it with ggml's own matmul from
llama-cpp-python's library: equal to ~1e-7). The model-level hooks (`llama_cpp_activations`)
give a PyTorch model that computes what llama.cpp computes from the same grid, up to float
summation order. Used by the evaluate stage to measure the parity floor: the same model and
rounding in fp32 and fp64 already disagree by about as much as llama.cpp and PyTorch do,
because 8-bit activation rounding turns tiny float differences into whole code steps.
The backward pass is the identity (straight-through), so the hooks can also be trained through.
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.formats.ggml_blocks import GGML_TYPES, divide_or_zero

VEC_DOT = {"q4_0": "q8_0", "q5_0": "q8_0", "q8_0": "q8_0", "q4_1": "q8_1", "q4_k": "q8_k", "q6_k": "q8_k"}


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> the values ggml's Q8_0 (and Q8_1) blocks of 32 stand for."""
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    q = torch.round(b * divide_or_zero(127.0, amax))
    return (q * (amax / 127).half().to(x.dtype)).reshape(x.shape)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> the values ggml's Q8_K blocks of 256 stand for."""
    b = x.reshape(-1, 256)
    mx = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
    iscale = divide_or_zero(-127.0, mx)
    q = torch.round(iscale * b).clamp(max=127)
    return (q * divide_or_zero(1.0, iscale)).reshape(x.shape)


_ROUND = {"q8_0": _q8_0, "q8_1": _q8_0, "q8_k": _q8_k}


def round_activations(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (..., C) as llama.cpp's CPU matmul sees it before a weight of exact format `fmt`
    (e.g. "q4_k"); identity gradient."""
    rounded = _ROUND[VEC_DOT[fmt]](x.detach())
    return x + (rounded - x).detach()


def llama_cpp_activations(model: nn.Module, plan: dict[str, str]) -> nn.Module:
    """Round the input of every linear layer whose weight the plan ({weight name: GGML type})
    quantizes, as llama.cpp does; returns the model (hooks stay registered)."""
    for name, module in model.named_modules():
        fmt = GGML_TYPES.get(plan.get(f"{name}.weight", ""))
        if isinstance(module, nn.Linear) and fmt in VEC_DOT:
            module.register_forward_pre_hook(lambda _m, args, fmt=fmt: (round_activations(args[0], fmt), *args[1:]))
    return model
