"""Device predictions against their own citations and their roofline; llama-perplexity's
logits-file format and KL statistics."""

import numpy as np
import pytest

from edgekit.bench import kld
from edgekit.bench.roofline import predict_decode
from edgekit.bench.targets import PROFILES

DEVICES = [name for name, p in PROFILES.items() if p.get("predict_only")]


@pytest.mark.parametrize("name", DEVICES)
def test_a_device_profile_reproduces_its_cited_measurements(name):
    prof = PROFILES[name]
    assert prof["measured"], f"{name} cites no measurement"
    for m in prof["measured"]:
        assert m["source"]
        pred = predict_decode(prof, m["bytes"], m["weights"])
        assert pred["decode_tps"] == pytest.approx(m["decode_tps"], rel=0.15), (name, m["model"])


@pytest.mark.parametrize("name", DEVICES)
@pytest.mark.parametrize("size_mb", [0.5, 5, 50, 100, 500, 4000])
def test_no_prediction_exceeds_the_device_roofline(name, size_mb):
    prof = PROFILES[name]
    for bits in (4, 8, 16):  # weights per byte differ by file type
        pred = predict_decode(prof, size_mb * 1e6, size_mb * 1e6 * 8 / bits)
        assert 0 < pred["decode_tps"] <= pred["roofline_tps"]
        if not pred["cache_resident"]:
            assert pred["decode_tps"] <= prof["effective_bandwidth_gbs"] * 1e9 / (size_mb * 1e6) + 1e-9


def test_a_model_small_enough_for_the_cache_is_held_by_the_compute_bound():
    prof = PROFILES["raspberry-pi-5"]
    pred = predict_decode(prof, 1e6, 2e6)  # 1 MB, in its 2 MB cache
    assert pred["cache_resident"] and pred["bound"] == "compute"
    assert pred["decode_tps"] == pytest.approx(prof["effective_gops"] * 1e9 / 4e6)
    assert pred["decode_tps"] < pred["roofline_tps"]
    big = predict_decode(prof, 100e6, 200e6)
    assert not big["cache_resident"] and big["bound"] == "memory"


def test_packed_log_probs_round_trip_within_the_format_step():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(5, 101)).astype(np.float32)
    lp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    back = kld.unpack(kld.pack(logits), 101)
    keep = lp > lp.max(-1, keepdims=True) - kld.SPAN
    step = (logits.max(-1) - np.maximum(logits.min(-1), logits.max(-1) - 16)) / 65535
    assert np.all(np.abs(back - lp)[keep] <= (step[:, None] / 2 + 1e-5).repeat(101, 1)[keep])


def test_kld_statistics_of_a_model_against_itself_and_a_perturbed_copy(tmp_path):
    rng = np.random.default_rng(1)
    table = rng.normal(0, 2, size=(50, 64)).astype(np.float32)  # a "model": logits depend on the token
    tokens = kld.chunks(rng.integers(0, 50, size=4 * 32).tolist(), 32)
    base = tmp_path / "base.kld"
    kld.write_logits_file(base, tokens, 64, bos=7, logits_of=lambda ids: table[ids])
    toks, vocab, packed = kld.read_logits_file(base)
    assert vocab == 64 and np.array_equal(toks, tokens) and len(list(packed)) == 4
    same = kld.compare_to_file(base, lambda ids: table[ids], bos=7)
    # the format's resolution: a float32 offset per row (min_log_prob) moves the KL by ~1e-6
    assert abs(same["kld_mean"]) < 2e-6 and same["same_top"] == 1.0 and same["ppl_ratio"] == pytest.approx(1, abs=1e-4)
    assert same["tokens"] == 4 * (32 - 1 - 16)
    noisy = table + rng.normal(0, 0.5, size=table.shape).astype(np.float32)
    other = kld.compare_to_file(base, lambda ids: noisy[ids], bos=7)
    assert other["kld_max"] >= other["kld_p999"] >= other["kld_p99"] >= other["kld_median"] > 0
    assert 1e-3 < other["kld_mean"] < 1 and other["same_top"] < 1
    (tmp_path / "short.kld").write_bytes(base.read_bytes()[:-100])
    with pytest.raises(Exception, match="truncated"):
        kld.read_logits_file(tmp_path / "short.kld")


def test_llama_perplexity_statistics_are_parsed():
    text = """====== Perplexity statistics ======
Mean PPL(Q)                   :  22.901234 ±   0.5
Mean PPL(base)                :  21.240000 ±   0.5
Mean PPL(Q)/PPL(base)         :   1.078213 ±   0.003
====== KL divergence statistics ======
Mean    KLD:   0.055123 ±   0.001
Maximum KLD:   3.100000
99.9%   KLD:   1.800000
99.0%   KLD:   0.600000
Median  KLD:   0.020000
Same top p: 84.100 ± 0.400 %
"""
    r = kld.parse_llama_perplexity(text)
    assert r["kld_mean"] == 0.055123 and r["same_top"] == pytest.approx(0.841) and r["ppl"] == 22.901234
    with pytest.raises(Exception, match="kld_mean"):
        kld.parse_llama_perplexity(text.replace("Mean    KLD", "Mean KL"))


def test_emulation_names_what_is_missing(tmp_path, monkeypatch):
    from edgekit.bench.emulate import emulator
    from edgekit.bench.targets import target
    from edgekit.errors import EdgekitError

    monkeypatch.setenv("EDGEKIT_LLAMA_AARCH64", str(tmp_path / "nothing"))
    with pytest.raises(EdgekitError, match="build_llama_aarch64.sh armv8.2-a\\+dotprod"):
        emulator(target("raspberry-pi-5"))
    with pytest.raises(EdgekitError, match="no ARM build"):
        emulator(target("laptop"))


def test_onnx_emulation_names_what_is_missing(tmp_path, monkeypatch):
    from edgekit.bench.emulate import emulate_files, ort_emulator
    from edgekit.bench.targets import target
    from edgekit.errors import EdgekitError

    monkeypatch.setenv("EDGEKIT_ORT_AARCH64", str(tmp_path / "nothing"))
    with pytest.raises(EdgekitError, match="build_ort_aarch64.sh"):
        ort_emulator(target("snapdragon-8-gen-3"))
    # neither a GGUF nor an onnxruntime-genai folder: refused before anything runs
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(EdgekitError, match="model.bin"):
        emulate_files([tmp_path / "model.bin"], ["raspberry-pi-5"], "unused", None, 64, 1)


def test_the_evaluate_statistics_match_llama_perplexitys_arithmetic(tmp_path):
    """quality.evaluate (edgekit eval, the evaluate stage) and kld.KLDStats (llama-perplexity's
    formulas on its packed base file) give the same KL statistics for the same two models."""
    import torch

    from edgekit.bench.quality import evaluate

    rng = np.random.default_rng(2)
    ref_table = rng.normal(0, 2, size=(60, 80)).astype(np.float32)
    cand_table = ref_table + rng.normal(0, 0.4, size=ref_table.shape).astype(np.float32)
    tokens = kld.chunks(rng.integers(0, 60, size=6 * 40).tolist(), 40)
    base = tmp_path / "ref.kld"
    kld.write_logits_file(base, tokens, 80, bos=None, logits_of=lambda ids: ref_table[ids])
    theirs = kld.compare_to_file(base, lambda ids: cand_table[ids], bos=None)
    # evaluate() scores every position; restrict it to the ones llama-perplexity scores
    half = tokens[:, 40 // 2:]
    ours = evaluate({"c": lambda row: torch.from_numpy(np.vstack([cand_table[row.numpy()]])),
                     "r": lambda row: torch.from_numpy(ref_table[row.numpy()])}, torch.from_numpy(half.astype(np.int64)),
                    [("c", "r")])["c|r"]
    assert ours["kl"] == pytest.approx(theirs["kld_mean"], rel=1e-3, abs=2e-6)
    assert ours["kld_median"] == pytest.approx(theirs["kld_median"], rel=1e-2)
    assert ours["kld_p99"] == pytest.approx(theirs["kld_p99"], rel=1e-2)
    assert ours["kld_max"] == pytest.approx(theirs["kld_max"], rel=1e-2)
    assert ours["top1"] == pytest.approx(theirs["same_top"])
    assert ours["ppl_ratio"] == pytest.approx(theirs["ppl_ratio"], rel=1e-3)
