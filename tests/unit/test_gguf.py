"""Our GGUF writer through the real llama.cpp: loads, tokenizes alike, computes the same logits."""

import collections
import json

import numpy as np
import pytest
import torch

from edgekit.bench.llama_runner import llama_scorer, load_llama
from edgekit.bench.quality import evaluate, torch_scorer
from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.export.gguf_read import read_metadata, tensor_table
from edgekit.export.gguf_write import _permute_rotary, write_gguf
from edgekit.export.llama_quantize import quantize_gguf
from edgekit.models.loading import load_causal_lm


@pytest.fixture(scope="module")
def tiny_gguf(tiny_teacher_dir, tmp_path_factory):
    return write_gguf(tiny_teacher_dir, tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf", "f16", name="tiny")


def test_metadata_and_tensors(tiny_gguf, tiny_teacher_dir):
    cfg = json.loads((tiny_teacher_dir / "config.json").read_text())
    meta = read_metadata(tiny_gguf)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == cfg["num_hidden_layers"]
    assert meta["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert len(meta["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    types = collections.Counter(t["type"] for t in tensor_table(tiny_gguf))
    assert set(types) == {"F16", "F32"}
    names = {t["name"] for t in tensor_table(tiny_gguf)}
    assert "output.weight" not in names  # tied embeddings are not written twice
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names


def test_rotary_permutation_is_a_per_head_interleave():
    w = np.arange(8)[:, None].astype(np.float32)  # 1 head of dim 8: rows [0..3 | 4..7] -> pairs
    assert _permute_rotary(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_llama_cpp_computes_the_pytorch_logits(tiny_gguf, tiny_teacher_dir):
    model = load_causal_lm(tiny_teacher_dir)
    rows = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    r = evaluate({"torch": torch_scorer(model), "gguf": llama_scorer(tiny_gguf, ctx=32)}, rows, [("gguf", "torch")])
    assert r["gguf|torch"]["kl"] < 1e-3
    assert r["gguf|torch"]["top1"] > 0.97
    assert r["gguf"]["ppl"] == pytest.approx(r["torch"]["ppl"], rel=0.01)


def test_tokenizer_matches(tiny_gguf, tiny_teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    llm = load_llama(tiny_gguf, n_ctx=64)
    text = "Return the value of the argument, as a string."
    assert llm.tokenize(text.encode(), add_bos=False) == tok(text)["input_ids"]


def test_quantize_q8_0_keeps_quality(tiny_gguf, tmp_path):
    q = quantize_gguf(tiny_gguf, tmp_path / "tiny-Q8_0.gguf", "q8_0", threads=2)
    assert "Q8_0" in {t["type"] for t in tensor_table(q)}
    assert q.stat().st_size < tiny_gguf.stat().st_size
    rows = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    r = evaluate({"f16": llama_scorer(tiny_gguf, 32), "q8": llama_scorer(q, 32)}, rows, [("q8", "f16")])
    assert r["q8|f16"]["kl"] < 0.05  # random tiny weights with peaked logits amplify rounding
    assert r["q8|f16"]["top1"] > 0.9


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 10])
def test_corrupt_files_get_clear_errors(tmp_path, content, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(EdgekitError):
        read_metadata(bad)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(EdgekitError, match="corrupt or truncated"):
        tensor_table(cut)
    with pytest.raises(EdgekitError):
        load_llama(cut, n_ctx=32)


def test_inspect_cli(tiny_gguf, capsys):
    assert main(["inspect", str(tiny_gguf)]) == 0
    out = capsys.readouterr().out
    assert "general.architecture = llama" in out and "tensor types: F16" in out


def test_eval_cli_against_a_reference(tiny_gguf, tmp_path, capsys):
    from tests.conftest import corpus_texts

    data = tmp_path / "hold.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(3)))
    assert main(["eval", str(tiny_gguf), "--data", str(data), "--reference", str(tiny_gguf),
                 "--ctx", "32", "--max-tokens", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 62 and r["kl_vs_reference"] < 1e-6 and r["top1_vs_reference"] == 1.0
    assert r["ppl"] == pytest.approx(r["reference_ppl"])


def test_bench_cli_measures_and_labels_predictions(tiny_gguf, capsys):
    assert main(["bench", str(tiny_gguf), "--target", "laptop", "--target", "raspberry-pi-5", "--repeats", "1",
                 "--prompt-tokens", "8", "--gen-tokens", "4", "--json"]) == 0
    laptop, pi = json.loads(capsys.readouterr().out)
    assert not laptop["predicted"] and laptop["decode_tps"] > 0 and 0 < laptop["roofline_share"]
    assert laptop["bytes_per_token"] <= tiny_gguf.stat().st_size
    assert pi["predicted"] and pi["roofline_share"] == laptop["roofline_share"]
    assert main(["bench", str(tiny_gguf), "--target", "laptp"]) == 2
    assert "did you mean 'laptop'" in capsys.readouterr().err
