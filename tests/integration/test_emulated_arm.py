"""GGUF files on a Raspberry Pi 5's ARM kernels: llama.cpp cross-built for armv8.2-a+dotprod,
run under qemu-user (cortex-a76), against x86 llama.cpp and PyTorch on the same tokens."""

import json

import pytest

from edgekit.bench.emulate import build_dir
from edgekit.bench.targets import PROFILES
from edgekit.cli import main
from edgekit.export.gguf_write import write_gguf
from edgekit.export.llama_quantize import quantize_gguf
from tests.conftest import corpus_texts

pytestmark = pytest.mark.integration


@pytest.fixture
def pi5_build():
    import shutil

    march = PROFILES["raspberry-pi-5"]["emulate"]["march"]
    if shutil.which("qemu-aarch64") is None or not (build_dir(march) / "bin" / "llama-perplexity").is_file():
        pytest.skip("llama.cpp for aarch64 is not built or qemu-user is missing: `make test` builds it when root + apt "
                    f"(bash third_party/build_llama_aarch64.sh {march})")


def test_files_run_on_the_pi_5_kernels_as_they_do_on_x86(pi5_build, tiny_teacher_dir, tmp_path, capsys):
    f16_file = write_gguf(tiny_teacher_dir, tmp_path / "tiny-F16.gguf", "f16")
    files = [f16_file, quantize_gguf(f16_file, tmp_path / "tiny-Q4_0.gguf", "q4_0")]  # Q4_0: repacked for ARM there
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(40)[20:]))
    assert main(["bench", *map(str, files), "--target", "raspberry-pi-5", "--emulate", "--data", str(data),
                 "--reference", str(tiny_teacher_dir), "--ctx", "64", "--chunks", "4", "--json"]) == 0
    f16, q4 = json.loads(capsys.readouterr().out)
    for r in (f16, q4):
        assert r["emulated"] and r["kernels"] == "armv8.2-a+dotprod" and r["tokens"] == 4 * 31
        assert r["top1_vs_x86"] > 0.95 and r["ppl"] == pytest.approx(r["ppl_x86"], rel=0.01)
    assert f16["kl_vs_x86"] < 1e-3
    # Q4_0 runs other kernels on ARM (repacked 4x8 blocks, dotprod): measurably not x86's arithmetic (measured
    # 0.0046 here, on a tiny random model with very peaked logits), but far below what Q4_0 itself loses
    assert 0 < q4["kl_vs_x86"] < 0.01 * q4["kl_vs_torch"]
    # F16 holds the PyTorch weights: ARM and x86 llama.cpp are both at the format's floor against them
    assert f16["kl_vs_torch"] < 1e-3 and f16["floor_kl"] < 1e-3  # fp16 rounding of the weights (1e-4 here)
    # Q4_0 loses real information: llama-perplexity's KL on ARM (its own arithmetic) and ours on x86
    # (edgekit.bench.kld, from the same base file) measure the same loss
    assert q4["floor_kl"] > 10 * f16["floor_kl"]
    assert q4["kl_vs_torch"] == pytest.approx(q4["floor_kl"], rel=0.1, abs=2e-5)
    assert q4["ppl"] != pytest.approx(f16["ppl"], rel=1e-4)



@pytest.fixture
def ort_arm():
    import shutil

    from edgekit.bench.emulate import ort_runtime_dir

    if shutil.which("qemu-aarch64") is None or not (ort_runtime_dir() / ".complete").is_file():
        pytest.skip("ONNX Runtime for aarch64 is not set up or qemu-user is missing: `make test` sets it up when root + apt "
                    "(bash third_party/build_ort_aarch64.sh)")


def test_an_int4_onnx_folder_runs_on_arm_onnx_runtime_as_it_does_on_x86(ort_arm, tiny_bundle, tiny_teacher_dir, tmp_path, capsys):
    folder = tiny_bundle / "tiny-int4-onnx"
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(40)[20:]))
    assert main(["bench", str(folder), "--target", "raspberry-pi-5", "--target", "snapdragon-8-gen-3", "--emulate",
                 "--data", str(data), "--reference", str(tiny_teacher_dir), "--ctx", "64", "--chunks", "4", "--json"]) == 0
    pi5, phone = json.loads(capsys.readouterr().out)
    assert (pi5["target"], phone["target"]) == ("raspberry-pi-5", "snapdragon-8-gen-3")
    assert phone["qemu_cpu"] == "max,sve=off,sme=off"  # the phone's kernel offers no SVE; ORT must not take SVE paths
    for r in (pi5, phone):
        assert r["emulated"] and r["runtime"] == "onnxruntime" and r["tokens"] == 4 * 31
        # the tiny random model's next-token distributions are nearly flat (perplexity ~5,800), so its top
        # token flips easily: measured 85% same top, perplexity within 1.3%
        assert r["top1_vs_x86"] > 0.75 and r["ppl"] == pytest.approx(r["ppl_x86"], rel=0.03)
        # ARM's MatMulNBits computes in int8 with its own dot-product kernels: not x86's arithmetic bit for bit
        # (measured KL 0.032), but far below what int4 itself loses against the PyTorch model (2.1 on this
        # model), which ARM and x86 lose alike
        assert 0 < r["kl_vs_x86"] < 0.05 * r["floor_kl"]
        assert r["kl_vs_torch"] == pytest.approx(r["floor_kl"], rel=0.15)
