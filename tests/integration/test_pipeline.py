"""The runner on a tiny recipe: end to end through llama.cpp, cache, rerun from a change, resume."""


import pytest

from edgekit.cli import main
from edgekit.fsutil import read_json

pytestmark = pytest.mark.integration  # whole pipelines on tiny models


def run(recipe, runs, *extra):
    assert main(["run", str(recipe), "--runs-dir", str(runs), *extra]) == 0
    return runs / "tiny"


def keys(run_dir):
    return {p.name: read_json(p / "artifact.json")["key"] for p in sorted((run_dir / "stages").iterdir())
            if (p / "artifact.json").is_file()}


def test_end_to_end_then_cached_then_partial_rerun(tiny_recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = run(tiny_recipe, runs)
    exported = sorted(p.name for p in (run_dir / "export").iterdir())
    assert exported == ["README.md", "tiny-student-F16.gguf", "tiny-student-Q8_0.gguf", "tiny-student-int4-onnx"]
    assert "llama-cli -m tiny-student-F16.gguf" in (run_dir / "export" / "README.md").read_text()
    assert "onnxruntime_genai" in (run_dir / "export" / "README.md").read_text()
    assert (run_dir / "export" / "tiny-student-int4-onnx" / "genai_config.json").is_file()
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html  # self-contained, plots embedded
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["decode_speed.png", "quality_vs_size.png"]
    report = (run_dir / "report.md").read_text()
    assert "Quality on held-out text" in report and "Parity" in report and "decode tok/s" in report
    manifest = read_json(run_dir / "manifest.json")
    assert manifest["inputs"]["data"]["holdout_documents"] >= 1
    assert set(manifest["artifacts"]) == {"distill", "export", "evaluate", "bench", "report"}
    ev = manifest["artifacts"]["evaluate"]["metrics"]
    assert ev["gguf_f16|student"]["top1"] > 0.97  # parity of the F16 export with its PyTorch model
    # ONNX Runtime ran the int4 folder (int4 RTN of tiny random weights is lossy: the real-model bound is in integration)
    assert 0 < ev["onnx_int4|student"]["kl"] < 5 and ev["onnx_int4"]["ppl"] > 1
    backends = {r["backend"] for r in manifest["artifacts"]["bench"]["metrics"]["rows"]}
    assert backends == {"llama.cpp", "onnxruntime"}
    assert (run_dir / "recipe.lock.yaml").is_file()
    assert not list((run_dir / "stages").glob("*.partial"))

    first = keys(run_dir)
    gguf_bytes = (run_dir / "export" / "tiny-student-Q8_0.gguf").read_bytes()
    capsys.readouterr()
    run(tiny_recipe, runs)
    assert capsys.readouterr().out.count("] cached") == 5
    assert keys(run_dir) == first

    run(tiny_recipe, runs, "stages.bench.gen_tokens=3")
    out = capsys.readouterr().out
    assert out.count("] cached") == 3 and "[04-bench] running" in out and "[05-report] running" in out
    second = keys(run_dir)
    assert [second[k] == first[k] for k in sorted(first)] == [True, True, True, False, False]
    assert (run_dir / "export" / "tiny-student-Q8_0.gguf").read_bytes() == gguf_bytes


def test_training_is_deterministic(tiny_recipe, tmp_path):
    a = run(tiny_recipe, tmp_path / "a", "stages=[{type: distill, steps: 2, batch_size: 2}, {type: export, formats: [f16]}]")
    b = run(tiny_recipe, tmp_path / "b", "stages=[{type: distill, steps: 2, batch_size: 2}, {type: export, formats: [f16]}]")
    fa = (a / "export" / "tiny-student-F16.gguf").read_bytes()
    assert fa == (b / "export" / "tiny-student-F16.gguf").read_bytes()


def test_unknown_from_stage(tiny_recipe, tmp_path, capsys):
    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path), "--from", "qat"]) == 2
    assert "--from 'qat' is not a stage" in capsys.readouterr().err
