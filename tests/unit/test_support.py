"""`edgekit validate` says, in seconds and before any model loads, whether the teacher's
architecture can go through every stage asked for (llama.cpp's converter for GGUF, QAT and
GPTQ; onnxruntime-genai's builder for onnx_int4), and catches a student of another vocabulary."""

import json
import shutil
import time

import pytest

from edgekit.cli import main
from tests.unit.test_bad_inputs import BASE, DOCS


def recipe_with(tmp_path, teacher_dir, architecture: str | None = None, formats: str = "[f16]"):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    if architecture:
        cfg = json.loads((teacher / "config.json").read_text())
        (teacher / "config.json").write_text(json.dumps({**cfg, "architectures": [architecture]}))
    (tmp_path / "d.jsonl").write_text(DOCS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("{teacher}", str(teacher)).replace("formats: [f16]", f"formats: {formats}"))
    return recipe


@pytest.mark.parametrize("architecture,formats,expect", [
    ("NoSuchForCausalLM", "[f16]", "llama.cpp's converter does not know architecture NoSuchForCausalLM"),
    ("Olmo2ForCausalLM", "[f16, onnx_int4]", "onnxruntime-genai's builder does not support Olmo2ForCausalLM"),
])
def test_unsupported_architectures_are_refused_before_any_work(architecture, formats, expect, tiny_teacher_dir,
                                                                tmp_path, capsys):
    recipe = recipe_with(tmp_path, tiny_teacher_dir, architecture, formats)
    for cmd in ("validate", "run"):
        t0 = time.monotonic()
        assert main([cmd, str(recipe), "--runs-dir", str(tmp_path / "runs")] if cmd == "run" else [cmd, str(recipe)]) == 2
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err, err
        assert time.monotonic() - t0 < 30
    assert not (tmp_path / "runs" / "t" / "stages").exists()  # nothing ran


def test_a_supported_teacher_is_named(tiny_teacher_dir, tmp_path, capsys):
    assert main(["validate", str(recipe_with(tmp_path, tiny_teacher_dir, formats="[f16, q8_0, onnx_int4]"))]) == 0
    assert "teacher architecture LlamaForCausalLM (model_type llama)" in capsys.readouterr().out


def test_a_student_of_another_vocabulary_is_caught_by_validate(tiny_teacher_dir, tmp_path, capsys):
    from tests.conftest import other_vocab_student

    student = other_vocab_student(tmp_path)
    recipe = recipe_with(tmp_path, tiny_teacher_dir)
    recipe.write_text(recipe.read_text().replace("student: {init: teacher_layers, keep_every: 2}",
                                                 f"student: {{init: model, model: {student}}}"))
    assert main(["validate", str(recipe)]) == 2
    assert "different vocabularies" in capsys.readouterr().err


def test_an_fp16_gemma_teacher_is_refused(tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    """Gemma's activations overflow fp16 (NaN logits, measured on Gemma 3 270M): validate says so
    instead of letting KD fail later on a NaN loss that reads like a learning-rate problem.
    (The tiny teacher is a llama: it stands in for a Gemma here.)"""
    from edgekit.stages import support

    monkeypatch.setattr(support, "FP16_OVERFLOWS", ("llama",))
    recipe = recipe_with(tmp_path, tiny_teacher_dir)
    fp16 = tmp_path / "fp16.yaml"
    fp16.write_text(recipe.read_text().replace("teacher: {model: ", "teacher: {load: fp16, model: "))
    assert main(["validate", str(fp16)]) == 2
    assert "llama activations overflow float16" in capsys.readouterr().err
    assert main(["validate", str(recipe)]) == 0
    bf16 = tmp_path / "bf16.yaml"  # what the refusal offers: the same memory, float32's exponent range
    bf16.write_text(recipe.read_text().replace("teacher: {model: ", "teacher: {load: bf16, model: "))
    assert main(["validate", str(bf16)]) == 0


def test_a_vocabulary_as_wide_as_a_layer_is_refused_for_onnx(tiny_teacher_dir, tmp_path, capsys):
    """onnxruntime-genai's builder takes every layer with vocab_size outputs for the LM head (a
    tiny model whose vocabulary equalled its intermediate_size exported with 0% top-1 agreement)."""
    from edgekit.errors import EdgekitError
    from edgekit.export.onnx_export import export_onnx_int4

    recipe = recipe_with(tmp_path, tiny_teacher_dir, formats="[f16, onnx_int4]")
    config = tmp_path / "teacher" / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "intermediate_size": cfg["vocab_size"]}))
    assert main(["validate", str(recipe)]) == 2
    assert "as wide as the model's intermediate_size" in capsys.readouterr().err
    with pytest.raises(EdgekitError, match="LM head"):
        export_onnx_int4(tmp_path / "teacher", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
