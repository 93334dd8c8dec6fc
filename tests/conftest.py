"""Fixtures: a tiny byte-level BPE tokenizer and tiny random Llama models, built locally.

Tests never download. Unit tests use these (seconds); integration tests (marked
`integration`) use the real embedded models and runtimes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = (REPO / "recipes" / "data" / "stdlib_docs.jsonl")


def corpus_texts(n: int = 40) -> list[str]:
    return [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()[:n]]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_texts(), vocab_size=384, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


def make_tiny_llama(out: Path, tokenizer_dir: Path, layers: int = 4, seed: int = 0, hidden: int = 64,
                    init_range: float = 0.3, max_positions: int = 256) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      initializer_range=init_range,  # 0.3: peaked logits: a uniform teacher has nothing to teach
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("teacher") / "tiny-teacher", tiny_tokenizer_dir, layers=4)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_teacher_dir, tmp_path_factory) -> Path:
    """The tiny teacher as an app bundle: tiny-F16.gguf (llama.cpp) and tiny-int4-onnx/ (ONNX Runtime)."""
    from edgekit.export.gguf_write import write_gguf
    from edgekit.export.onnx_export import export_onnx_int4

    out = tmp_path_factory.mktemp("bundle")
    write_gguf(tiny_teacher_dir, out / "tiny-F16.gguf", "f16")
    export_onnx_int4(tiny_teacher_dir, out / "tiny-int4-onnx")
    return out


def run_teacher_recipe(folder: Path, name: str, teacher_dir: Path, stages: str, docs: int = 20) -> tuple[Path, dict]:
    """Run a recipe of `stages` (YAML list items, one per line) on `teacher_dir` and `docs`
    corpus documents (seq_len 32) in `folder`; (run directory, its manifest's artifacts)."""
    from edgekit.cli import main

    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(docs)))
    recipe = folder / f"{name}.yaml"
    recipe.write_text(f"name: {name}\nteacher: {{model: {teacher_dir}}}\n"
                      f"data: {{train: docs.jsonl, holdout_fraction: 0.2, seq_len: 32}}\nstages:\n{stages}")
    assert main(["run", str(recipe), "--runs-dir", str(folder / "runs")]) == 0
    run = folder / "runs" / name
    return run, json.loads((run / "manifest.json").read_text())["artifacts"]


def write_tiny_recipe(folder: Path, teacher_dir: Path) -> Path:
    """A full recipe on the tiny teacher, with data copied next to it."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(30)))
    recipe = folder / "tiny.yaml"
    recipe.write_text(f"""
name: tiny
teacher: {{model: {teacher_dir}}}
student: {{init: teacher_layers, keep_every: 2}}
data: {{train: docs.jsonl, holdout_fraction: 0.2, seq_len: 32}}
stages:
  - {{type: distill, steps: 4, batch_size: 2, loss_chunk: 16, checkpoint_every: 2, warmup_steps: 1}}
  - {{type: export, formats: [f16, q8_0, onnx_int4]}}
  - {{type: evaluate, max_tokens: 64, ctx: 32}}
  - {{type: bench, prompt_tokens: 8, gen_tokens: 4, repeats: 1}}
  - {{type: report, sample_tokens: 4}}
""")
    return recipe


@pytest.fixture
def tiny_recipe(tmp_path, tiny_teacher_dir) -> Path:
    return write_tiny_recipe(tmp_path, tiny_teacher_dir)


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edgekit-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(request, _session_cache, monkeypatch):
    """Tests write to a temporary cache shared by the session, never the user's, except tests
    marked `embedded`: they use the user's ($EDGEKIT_CACHE, else ~/.cache/edgekit) for the
    embedded models' converted copies, which take ~25 s each to make, and keep them."""
    import os

    if request.node.get_closest_marker("embedded"):
        return
    real = Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))
    if "EDGEKIT_LLAMA_TOOLS" not in os.environ:  # llama.cpp's own tools, if built: read only
        built = sorted(real.glob("llama-tools-*"))
        if built:
            monkeypatch.setenv("EDGEKIT_LLAMA_TOOLS", str(built[-1]))
    if "EDGEKIT_LLAMA_SRC" not in os.environ:  # llama.cpp's converter sources, if fetched (make setup): read only
        from edgekit.export.converter import converter_path

        fetched = converter_path()  # the user's cache: EDGEKIT_CACHE is not redirected yet
        if fetched.is_dir():
            monkeypatch.setenv("EDGEKIT_LLAMA_SRC", str(fetched))
    if "EDGEKIT_LLAMA_AARCH64" not in os.environ:  # llama.cpp cross-built for aarch64, if built: read only
        built = sorted(real.glob("llama-aarch64-*"))
        if built:
            monkeypatch.setenv("EDGEKIT_LLAMA_AARCH64", str(built[-1]))
    if "EDGEKIT_ORT_AARCH64" not in os.environ:  # ONNX Runtime's aarch64 wheel in an arm64 Python, if set up: read only
        import importlib.metadata as md

        ort = real / f"ort-aarch64-{md.version('onnxruntime')}"
        if ort.is_dir():
            monkeypatch.setenv("EDGEKIT_ORT_AARCH64", str(ort))
    monkeypatch.setenv("EDGEKIT_CACHE", str(_session_cache))


def file_rows(model_dir: Path, gguf_path: Path) -> dict:
    """{HF weight: (GGUF tensor, row order)} of a GGUF written from `model_dir`: the GGUF tensor's
    row i holds the weight's row order[i] (llama's Q/K rows are permuted by the converter)."""
    import gguf

    from edgekit.export.gguf_write import write_gguf
    from edgekit.export.tensor_map import layout

    f16 = write_gguf(model_dir, gguf_path.with_name(gguf_path.stem + ".layout-F16.gguf"), "f16")
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    return {p.hf: (tensors[name], p.rows) for name, p in layout(model_dir, f16).items() if name in tensors}


def other_vocab_student(folder: Path) -> Path:
    """A tiny student whose tokenizer (trained on reversed text) shares no vocabulary with the teacher's."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok_dir = folder / "other-tok"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([t[::-1] for t in corpus_texts()], vocab_size=300, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(tok_dir)
    return make_tiny_llama(folder / "other-student", tok_dir, layers=2)
