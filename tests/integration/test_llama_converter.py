"""Our GGUF writer against llama.cpp's own converter (convert_hf_to_gguf.py, from the
llama.cpp source of the llama-cpp-python version we pin; fetched at test time, never copied)."""

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.embedded]  # embedded: uses the user's cache
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_src() -> Path:
    out = subprocess.run(["bash", str(REPO / "third_party" / "llama_cpp_source.sh")], check=True, text=True,
                         stdout=subprocess.PIPE, env={**os.environ, "PYTHON": sys.executable})
    return Path(out.stdout.strip().splitlines()[-1])


def test_f16_gguf_matches_llama_cpp_converter(llama_src, tmp_path):
    from transformers import AutoTokenizer

    from edgekit.bench.llama_runner import load_llama
    from edgekit.export.gguf_write import write_gguf
    from edgekit.models.sources import resolve_model
    from tests.conftest import corpus_texts

    model = resolve_model("embedded:smollm2-135m-instruct", REPO).path
    theirs = tmp_path / "convert-F16.gguf"
    subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(model), "--outfile", str(theirs),
                    "--outtype", "f16"], check=True, capture_output=True)
    ours = write_gguf(model, tmp_path / "edgekit-F16.gguf", "f16")

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    for name in a:  # same names, types, shapes and bytes (rotary permutation included)
        assert a[name].tensor_type == b[name].tensor_type and list(a[name].shape) == list(b[name].shape), name
        assert np.array_equal(a[name].data, b[name].data), name

    tok = AutoTokenizer.from_pretrained(model)
    text = corpus_texts(45)[-1][:3000]
    ids = tok(text)["input_ids"][:256]
    logits = {}
    for label, path in (("ours", ours), ("theirs", theirs)):
        llm = load_llama(path, n_ctx=512, logits_all=True)
        llm.eval(ids)
        logits[label] = np.array(llm.scores[: len(ids)])
        if label == "ours":  # llama.cpp reads our tokenizer as transformers does, chat template included
            assert llm.tokenize(text.encode(), add_bos=False, special=False)[: len(ids)] == ids
            assert "<|im_start|>" in llm.metadata.get("tokenizer.chat_template", "")
        del llm
    assert np.array_equal(logits["ours"], logits["theirs"])  # the same computation, bit for bit


def test_gemma3_f16_gguf_matches_the_shipped_gguf(tmp_path):
    """Gemma 3 270M: the embedded GGUF (written by llama.cpp's converter) -> transformers -> our
    writer gives back the same tensors (norms, stored with Gemma's +1, bit for bit; the rest to
    fp16 rounding of the Q4_K_M originals) and llama.cpp computes transformers' logits from it."""
    import torch

    from edgekit.bench.llama_runner import llama_scorer
    from edgekit.bench.quality import evaluate, torch_scorer
    from edgekit.export.gguf_write import write_gguf
    from edgekit.models.embedded import get_embedded
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.sources import cache_dir, resolve_model
    from tests.conftest import corpus_texts

    src = resolve_model("embedded:gemma3-270m", REPO).path
    ours = write_gguf(src, tmp_path / "gemma-F16.gguf", "f16")
    orig = {t.name: t for t in gguf.GGUFReader(get_embedded("gemma3-270m").gguf_path(cache_dir())).tensors}
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert sorted(orig) == sorted(mine)
    for name, t in orig.items():
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        b = gguf.quants.dequantize(mine[name].data, mine[name].tensor_type).reshape(-1)
        if t.tensor_type.name == "F32":
            assert np.array_equal(a, b), name
        else:
            assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max(), name

    # the converted directory's tokenizer (SentencePiece BPE rebuilt from the GGUF's scores:
    # transformers' GGUF import made it a Unigram that split text into characters) tokenizes as
    # llama.cpp does, on prose, chat, code and odd whitespace
    import json

    from transformers import AutoTokenizer

    from edgekit.bench.llama_runner import load_llama

    shipped = load_llama(get_embedded("gemma3-270m").gguf_path(cache_dir()), n_ctx=256)
    hf = AutoTokenizer.from_pretrained(src)
    general = REPO / "recipes" / "data" / "general"
    texts = [corpus_texts(45)[-1]] + [json.loads(f.read_text().splitlines()[0])["text"][:4000] for f in sorted(general.glob("*.jsonl"))]
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == shipped.tokenize(text.encode(), add_bos=False, special=True)
    ids = torch.tensor([[hf.bos_token_id] + hf(corpus_texts(45)[-1], add_special_tokens=False)["input_ids"][:127]])
    del shipped
    res = evaluate({"llama": llama_scorer(ours, ctx=128), "torch": torch_scorer(load_causal_lm(src))}, ids,
                   [("llama", "torch")])
    assert res["llama|torch"]["kl"] < 1e-3 and res["llama|torch"]["top1"] > 0.97, res
    assert res["torch"]["ppl"] < 100, res  # a real model on English prose, not noise
