"""One line describing the machine: every committed measurement says where it was made."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache  # read once: the trainer asks for every micro-step's precision
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the Linux kernel reports them (empty elsewhere)."""
    try:
        line = next((x for x in open("/proc/cpuinfo") if x.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_has_amx() -> bool:
    """Intel AMX (Sapphire Rapids and later), as the Linux kernel reports it: native bf16 and
    int8 matrix tiles (oneDNN multiplies bf16 on them ~2x faster than fp32 here; llama.cpp's
    AMX paths crash in llama-cpp-python 0.3.36)."""
    return "amx_int8" in cpu_flags()


def cpu_has_bf16_matmul() -> bool:
    """A CPU that multiplies bf16 natively: AMX tiles (Intel Sapphire Rapids and later) or AVX-512
    BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake). With AMX oneDNN runs fp32 matmuls
    with bf16-rounded inputs ~2x faster than fp32 ones (2-core Xeon); on a Zen 4 EPYC it keeps
    them fp32 and bf16 tensors are what is fast (precision.fp32_matmuls_round_to_bf16); on CPUs
    without either, bf16 is emulated and slow."""
    return not cpu_flags().isdisjoint({"amx_bf16", "avx512_bf16"})


def machine_description() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"
