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
    assert m.backend == "onnxruntime" and m.n_ctx > 64
    short = runtime.load(bundle / "tiny-int4-onnx", n_ctx=64)  # n_ctx caps the folder's own context
    assert short.n_ctx == 64
    with pytest.raises(EdgekitError, match="context holds 64"):
        short.generate("word " * 80, max_tokens=4)


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


def test_a_draft_model_speculates_and_the_output_stays_the_models_own(bundle, tiny_tokenizer_dir, tmp_path):
    """Speculative decoding (llama-cpp-python's draft_model): a 1-layer draft with the same
    tokenizer proposes tokens, the model checks them; greedy text is unchanged, token for token."""
    from edgekit.export.gguf_write import write_gguf
    from tests.conftest import make_tiny_llama

    draft = write_gguf(make_tiny_llama(tmp_path / "draft", tiny_tokenizer_dir, layers=1, seed=3), tmp_path / "draft-F16.gguf", "f16")
    gguf = bundle / "tiny-F16.gguf"
    plain = runtime.load(gguf, n_ctx=256).generate("The module", max_tokens=40)
    fast = runtime.load(gguf, n_ctx=256, draft=draft, draft_tokens=3)
    assert fast.generate("The module", max_tokens=40) == plain
    assert fast.draft.proposed > 0  # the draft was asked for tokens
    assert "".join(fast.generate("The module", max_tokens=40, stream=True)) == plain  # again, on a warm draft cache
    with pytest.raises(EdgekitError, match="ONNX folder"):
        runtime.load(bundle / "tiny-int4-onnx", draft=draft)


def test_a_sliding_window_onnx_model_scores_and_generates_short_texts(tiny_teacher_dir, tmp_path):
    """ORT's attention refuses a KV cache shorter than the model's sliding window (Gemma 2/3,
    Mistral): scoring a short row or a short reply makes the cache the window long, and a reply
    still stops at max_tokens."""
    import json
    import shutil

    import torch

    from edgekit.bench.ort_runner import ort_scorer, sliding_window
    from edgekit.export.onnx_export import export_onnx_int4

    model = tmp_path / "mistral"
    shutil.copytree(tiny_teacher_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                                   "sliding_window": 64}))
    folder = export_onnx_int4(model, tmp_path / "onnx")
    assert sliding_window(folder) == 64
    assert torch.isfinite(ort_scorer(folder)(torch.tensor([5, 6, 7, 8]))).all()
    m = runtime.load(folder)
    assert m.generate("The module", max_tokens=3) is not None
    assert m.last_usage["completion_tokens"] <= 3
