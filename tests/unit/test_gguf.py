"""Our GGUF writer through the real llama.cpp: loads, tokenizes alike, computes the same logits."""

import collections
import json

import pytest
import torch

from edgekit.bench.llama_runner import llama_scorer, load_llama
from edgekit.bench.quality import evaluate, torch_scorer
from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.formats.gguf_read import read_metadata, tensor_table
from edgekit.export.gguf_write import write_gguf
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
    [r] = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 62 and r["kl_vs_reference"] < 1e-6 and r["top1_vs_reference"] == 1.0
    assert r["ppl"] == pytest.approx(r["reference_ppl"])
    # a folder of JSONL files: one subset each, with llama-perplexity's KL statistics
    general = tmp_path / "general"
    general.mkdir()
    for i, name in enumerate(["prose", "more"]):
        (general / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(6)[3 * i:3 * i + 3]))
    assert main(["eval", str(tiny_gguf), "--data", str(general), "--reference", str(tiny_gguf), "--ctx", "32",
                 "--max-tokens", "64", "--json"]) == 0
    [r] = json.loads(capsys.readouterr().out)
    assert set(r["subsets"]) == {"prose", "more"} and "ppl" not in r
    for sub in r["subsets"].values():
        assert sub["tokens"] == 62 and sub["kl_vs_reference"] < 1e-6 and sub["kld_max"] < 1e-5 and sub["ppl_ratio"] == pytest.approx(1)
    assert r["subsets"]["prose"]["ppl"] != pytest.approx(r["subsets"]["more"]["ppl"])


def test_bench_cli_measures_and_labels_predictions(tiny_gguf, capsys):
    from edgekit.bench.roofline import last_level_cache_bytes

    assert main(["bench", str(tiny_gguf), "--target", "laptop", "--target", "raspberry-pi-5", "--repeats", "1",
                 "--prompt-tokens", "8", "--gen-tokens", "4", "--json"]) == 0
    laptop, pi = json.loads(capsys.readouterr().out)
    assert not laptop["predicted"] and laptop["decode_tps"] > 0 and 0 < laptop["roofline_share"]
    assert laptop["bytes_per_token"] <= tiny_gguf.stat().st_size
    assert laptop["cache_resident"] == (last_level_cache_bytes() is not None)  # a tiny model fits any cache
    # the Pi is predicted from its own calibrated bounds, never above its roofline; a tiny model is compute-bound
    assert pi["predicted"] and pi["decode_tps"] <= pi["roofline_tps"] and pi["bound"] == "compute"
    assert main(["bench", str(tiny_gguf), "--target", "laptp"]) == 2
    assert "did you mean 'laptop'" in capsys.readouterr().err


def _tiny_other_arch(kind: str, out, tokenizer_dir):
    """A tiny random Qwen2 (q/k/v biases) or Gemma 3 text model (q/k norms, +1 norms,
    sliding-window layers, GELU MLP) with the tiny tokenizer."""
    import shutil

    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, initializer_range=0.2))
        with torch.no_grad():  # random biases, so a bias written wrong would show
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                                   initializer_range=0.2,
                                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]))
        with torch.no_grad():  # norms away from their zero init, so a missing +1 would show
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.mark.parametrize("kind,arch", [("qwen2", "qwen2"), ("gemma3", "gemma3")])
def test_other_architectures_compute_the_pytorch_logits(kind, arch, tiny_tokenizer_dir, tmp_path):
    """Qwen2 and Gemma 3 through our writer: llama.cpp computes what transformers computes
    (past the sliding window too: 24 tokens > window 8)."""
    src = _tiny_other_arch(kind, tmp_path / kind, tiny_tokenizer_dir)
    path = write_gguf(src, tmp_path / f"{kind}-F16.gguf", "f16")
    assert read_metadata(path)["general.architecture"] == arch
    rows = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    res = evaluate({"llama": llama_scorer(path, ctx=32), "torch": torch_scorer(load_causal_lm(src))}, rows,
                   [("llama", "torch")])
    assert res["llama|torch"]["kl"] < 1e-3 and res["llama|torch"]["top1"] > 0.95, res
    q8 = quantize_gguf(path, tmp_path / f"{kind}-Q8_0.gguf", "q8_0")  # llama.cpp's quantizer takes our file
    assert "Q8_0" in {t["type"] for t in tensor_table(q8)}


def test_gemma3_attention_scale_llama_cpp_cannot_express_is_refused(tiny_tokenizer_dir, tmp_path):
    src = _tiny_other_arch("gemma3", tmp_path / "g", tiny_tokenizer_dir)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "query_pre_attn_scalar": 99}))
    with pytest.raises(EdgekitError, match="query_pre_attn_scalar"):
        write_gguf(src, tmp_path / "g.gguf", "f16")
    assert not (tmp_path / "g.gguf").exists()


def test_llama_cpp_extra_buffers_are_off_only_on_amx_cpus(monkeypatch):
    """llama-cpp-python 0.3.36's AMX matmul segfaults on AMX CPUs (a Q8_0 file crashed in
    decode on a Sapphire Rapids VM); models load with its extra buffers off there, only there."""
    import llama_cpp.llama_cpp as api

    from edgekit.bench import llama_runner

    original = api.llama_model_default_params
    for amx in (True, False):
        monkeypatch.setattr(llama_runner, "cpu_has_amx", lambda amx=amx: amx)
        with llama_runner.amx_off():
            assert api.llama_model_default_params().use_extra_bufts is (not amx)
        assert api.llama_model_default_params is original and api.llama_model_default_params().use_extra_bufts


def test_a_smollm3_nope_pattern_llama_cpp_cannot_express_is_refused():
    from edgekit.export.gguf_write import refuse_inexpressible

    refuse_inexpressible({"model_type": "smollm3", "num_hidden_layers": 8, "no_rope_layers": [1, 1, 1, 0, 1, 1, 1, 0]})
    with pytest.raises(EdgekitError, match="every 4th"):  # a student that kept layers 0, 3, 4, 7 of its teacher
        refuse_inexpressible({"model_type": "smollm3", "num_hidden_layers": 4, "no_rope_layers": [1, 0, 1, 0]})
