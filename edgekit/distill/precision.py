"""Training precision: what `precision` (auto, fp32, bf16, bf16_matmul) means on the device
a step runs on, and the contexts and choices that carry it out (autocast of the trunks, oneDNN's
matmul setting, bf16 output heads in the fused loss)."""

from __future__ import annotations

import contextlib
import functools

import torch

from edgekit.machine import cpu_has_bf16_matmul


def resolved_precision(device: torch.device, precision: str) -> str:
    """What `precision: auto` means where the step runs: bf16 autocast on a GPU; on a CPU with
    native bf16 (AMX, AVX-512 BF16) bf16_matmul where oneDNN's fp32 matmuls really multiply
    bf16-rounded inputs (`fp32_matmuls_round_to_bf16`: ~2x the fp32 speed with AMX), else bf16
    autocast of the trunks (a 2-core Zen 4 EPYC: oneDNN computes those fp32 matmuls in fp32, and
    the trunks ran 1.55x faster under autocast); plain fp32 on CPUs without native bf16, whose
    bf16 is far slower than their fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if device.type != "cpu" or not cpu_has_bf16_matmul():
        return "fp32"
    return "bf16_matmul" if fp32_matmuls_round_to_bf16() else "bf16"


@functools.cache
def fp32_matmuls_round_to_bf16() -> bool:
    """Whether torch.set_float32_matmul_precision("medium") makes this CPU's fp32 matmuls round
    their inputs to bf16 (oneDNN's bf16 fpmath mode), probed once on a matmul of a loss chunk's
    kind. Measured: on a Zen 4 EPYC (AVX-512 BF16, torch 2.13, oneDNN 3.12) it does not: the
    products stay within fp32 error of fp64's (1e-4 against 0.3 for bf16 inputs), and the setting's
    speed there (1.7x "highest" on a head-sized matmul) is oneDNN's fp32 kernel against MKL's."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 640, generator=g), torch.randn(640, 2048, generator=g)
    exact = a.double() @ b.double()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        err = float((a @ b - exact).abs().max())
    finally:
        torch.set_float32_matmul_precision(before)
    bf16_err = float((a.bfloat16().double() @ b.bfloat16().double() - exact).abs().max())
    return err > bf16_err / 10


def bf16_heads(device: torch.device, precision: str) -> bool:
    """Whether the fused loss multiplies the output heads in bf16 (chunked_loss's `bf16_heads`):
    under `bf16`, as the trunks' autocast does (on a GPU, and on CPUs where auto picks it)."""
    return resolved_precision(device, precision) == "bf16"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the trunks' forward (weights, optimizer state, the loss and its
    gradient stay fp32; the fused loss's heads multiply in bf16 on their own: bf16_heads): on
    GPUs, and on CPUs where `resolved_precision` picks it."""
    if resolved_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def matmul_precision(device: torch.device, precision: str):
    """`bf16_matmul`: for the duration, every fp32 matmul (trunks, output heads, their
    gradients) may round its inputs to bf16 and accumulate in fp32, fp32 out
    (torch.set_float32_matmul_precision("medium"): oneDNN; see fp32_matmuls_round_to_bf16 for
    where it does); tensors, the loss and AdamW stay fp32. `bf16` on a CPU sets the same for any
    fp32 matmul outside the autocast trunks (the heads of losses without bf16_heads): oneDNN's
    kernel, 1.7x MKL's on a Zen 4 head."""
    mode = resolved_precision(device, precision)
    if not (mode == "bf16_matmul" or (mode == "bf16" and device.type == "cpu")):
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
