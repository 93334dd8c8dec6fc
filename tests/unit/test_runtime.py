"""edgekit.runtime on real llama.cpp and ONNX Runtime, with tiny exported models."""

import subprocess
import sys

import pytest

from edgekit import runtime
from edgekit.errors import EdgekitError


@pytest.fixture
def bundle(tiny_bundle):
    return tiny_bundle


def test_gguf_generate_and_stream(bundle):
    m = runtime.load(bundle / "tiny-F16.gguf")
    text = m.generate("The module", max_tokens=5)
    assert isinstance(text, str)
    assert "".join(m.generate("The module", max_tokens=5, stream=True)) == text  # greedy: same text
    assert m.backend == "llama.cpp"


def test_onnx_generate_and_stream(bundle):
    m = runtime.load(bundle / "tiny-int4-onnx")
    text = m.generate("The module", max_tokens=5)
    assert "".join(m.generate("The module", max_tokens=5, stream=True)) == text
    assert m.backend == "onnxruntime"


def test_bundle_directory_prefers_gguf(bundle):
    assert runtime.load(bundle).backend == "llama.cpp"


def test_bad_paths(tmp_path):
    with pytest.raises(EdgekitError, match="no .gguf file or ONNX model folder"):
        runtime.load(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(EdgekitError, match="neither a .gguf file"):
        runtime.load(tmp_path / "x.bin")


def test_chat_cli_streams_a_reply(bundle):
    proc = subprocess.run([sys.executable, "-m", "edgekit.cli", "chat", str(bundle / "tiny-F16.gguf"), "--max-tokens", "4"],
                          input="hello there\n\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "on llama.cpp" in proc.stderr
