"""int4 ONNX for ONNX Runtime, through onnxruntime-genai's model builder.

The builder writes `model.onnx` (+ external data) with MatMulNBits int4 weights (block 32),
a KV cache, `genai_config.json` and the tokenizer files, so onnxruntime-genai runs the
folder as is. We chose it over torch.onnx export + ORT's int4 quantizer because it runs
here in seconds and its graph (GroupQueryAttention, MatMulNBits) is ORT's fast CPU path
(the optimum fp32 export ran ~4x slower here: see shared/FACTS.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_path


def export_onnx_int4(model_dir: Path, out: Path, block_size: int = 32) -> Path:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise EdgekitError("the onnx_int4 export needs onnxruntime-genai", "pip install 'edgekit[onnx]'") from None
    with atomic_path(out) as tmp:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(tmp),
               "-p", "int4", "-e", "cpu", "--extra_options", f"int4_block_size={block_size}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (tmp / "model.onnx").is_file():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise EdgekitError(f"onnxruntime-genai's model builder failed on {model_dir.name}: {tail}",
                               "check the model is an architecture the builder supports (llama, qwen2, gemma, ...)")
        (tmp / "cache_dir").exists() and __import__("shutil").rmtree(tmp / "cache_dir")
    return out
