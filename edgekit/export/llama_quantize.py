"""GGUF quantization through llama.cpp's own quantizer (llama-cpp-python bindings).

Using llama.cpp's `llama_model_quantize` means the Q4_K_M mix (which tensors get Q4_K,
Q6_K, Q5_0 fallbacks for rows not divisible by 256, ...) is exactly llama.cpp's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.formats import MIXES, QUANT_MIXES
from edgekit.fsutil import atomic_path, quiet_stderr



def quantize_gguf(src: Path, out: Path, fmt: str, threads: int | None = None,
                  imatrix: dict[str, np.ndarray] | None = None) -> Path:
    """`imatrix`: {GGUF tensor name: mean squared input activation per column} (edgekit.quant.imatrix),
    handed to llama.cpp, which then weights each column's rounding error by it."""
    import ctypes

    import llama_cpp

    if fmt not in QUANT_MIXES:
        raise EdgekitError(f"unknown GGUF quantization '{fmt}'", f"use one of {list(QUANT_MIXES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, MIXES[fmt].llama_ftype)
    params.nthread = threads or os.cpu_count() or 1
    if imatrix:
        keep = [(k.encode(), np.ascontiguousarray(v, dtype=np.float32)) for k, v in imatrix.items()]
        entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
        for e, (name, values) in zip(entries, keep):
            e.name, e.size = name, values.size
            e.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[len(keep)].name = None  # the terminator llama.cpp stops at
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with atomic_path(out) as tmp:
        with quiet_stderr():  # llama.cpp logs every tensor to fd 2
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise EdgekitError(f"llama.cpp could not quantize {src.name} to {fmt} (return code {rc})",
                               "run with --debug to see llama.cpp's log; check the input GGUF loads in llama.cpp")
    return out
