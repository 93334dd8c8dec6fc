"""The architecture matrix (benchmarks/architectures.py) on tiny random models: every GGUF
column holds for each architecture llama.cpp's converter supports, with the parity figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "granite", "olmo2", "smollm3"]


def test_every_architecture_distills_quantizes_and_exports(tmp_path):
    out = tmp_path / "architectures.json"
    proc = subprocess.run([sys.executable, "benchmarks/architectures.py", *[f"--arch={a}" for a in ARCHS], "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["arch"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == sorted(ARCHS)
    for arch, r in rows.items():
        assert "error" not in r, r
        assert r["distill"] and r["qat"] and r["gguf_f16"] and r["gguf_q4_k_m"], r
        assert r["kl_vs_transformers_max"] <= 1e-4, r  # every position range up to 1,024 tokens
        assert r["tokens_equal"] and r["chat_template_equal"] and r["eos_bos_equal"], r
    for arch in set(ARCHS) - {"olmo2"}:
        assert rows[arch]["onnx_int4"] is True, rows[arch]  # the tokenizer, and the fp32 graph's KL <= 1e-4
    assert rows["olmo2"]["onnx_int4"] == "unsupported by the builder"
    assert rows["gemma3_text"]["kl_vs_converter_max"] > 1e-4  # the listed sliding-pattern fix changes the computation
    assert rows["llama"]["kl_vs_converter_max"] == 0.0
