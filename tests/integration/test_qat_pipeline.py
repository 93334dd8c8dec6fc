"""Whole-pipeline tests of qat on tiny models (moved from tests/unit/test_qat.py, whose
fixtures they share): each runs `edgekit run` end to end."""

import json
import pytest
from edgekit.cli import main

from tests.unit.test_qat import assert_file_holds_the_trained_grid, assert_onnx_holds_the_trained_grid  # noqa: F401  (fixtures and helpers)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("init,scales,activations,importance", [
    ("float", "recompute", "float", "none"), ("gptq", "recompute", "float", "none"), ("float", "learn", "float", "none"),
    ("float", "recompute", "llama_cpp", "none"), ("float", "recompute", "float", "imatrix")])
def test_qat_recipe_end_to_end_parity(tiny_recipe, tmp_path, init, scales, activations, importance):
    text = tiny_recipe.read_text().replace(
        "  - {type: export, formats: [f16, q8_0, onnx_int4]}",
        f"  - {{type: qat, steps: 3, batch_size: 2, loss_chunk: 16, lr: 1.0e-3, init: {init}, calibration_rows: 4, "
        f"scales: {scales}, scale_lr: 0.05, activations: {activations}, importance: {importance}}}\n"
        "  - {type: export, formats: [f16, q4_k_m, onnx_int4]}")
    tiny_recipe.write_text(text)
    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "tiny" / "manifest.json").read_text())["artifacts"]
    q = m["qat"]["metrics"]
    assert q["init"] == init and (q["gptq_init"]["tensors"] > 0 if init == "gptq" else "gptq_init" not in q)
    assert sum(q["fake_quantized"].values()) > 0
    assert not q["left_in_float"]  # widths of 64: every tensor falls back to an exact block format
    assert q["activations"] == activations
    assert q["scales"] == scales and (q["learned_scale_tensors"] > 10) == (scales == "learn")
    assert q["importance"] == importance
    qat_stage = next((tmp_path / "tiny" / "stages").glob("*-qat"))
    assert (qat_stage / "qat_importance.safetensors").is_file() == (importance == "imatrix")
    run_dir = tmp_path / "tiny"
    qat_dir = next((run_dir / "stages").glob("*-qat"))
    assert_file_holds_the_trained_grid(run_dir / "export" / "tiny-student-Q4_K_M.gguf", qat_dir)
    ev = m["evaluate"]["metrics"]
    # the weights are bit-identical (asserted above); logits differ only by llama.cpp's arithmetic (it
    # quantizes activations to 8 bits for these dot products): 0.003-0.01 on this tiny random model
    parity = ev["gguf_q4_k_m|student_qat"]
    assert parity["kl"] < 0.02 and parity["top1"] > 0.8
    assert "ptq_gguf_q4_k_m" in ev and "QAT-KD" in (run_dir / "report.md").read_text()
    # the ONNX folder holds the same grid: ONNX Runtime (int8 activations, accuracy_level 4) agrees as llama.cpp does
    onnx = m["export"]["metrics"]["onnx_int4"]
    assert onnx["writer"] == "edgekit (QAT grid)" and onnx["qat_grid_nodes"] == sum(onnx["tensor_types"].values())
    assert_onnx_holds_the_trained_grid(run_dir / "export" / "tiny-student-int4-onnx", qat_dir)
    assert ev["onnx_int4|student_qat"]["kl"] < 0.02 and ev["onnx_int4|student_qat"]["top1"] > 0.8



def test_data_free_qat_trains_on_the_teachers_own_answers(tiny_teacher_dir, tmp_path):
    """qat.sequence_kd: no training text; the teacher answers the prompts once (cached in the stage
    folder) and QAT-KD trains on those answers, as LLM-QAT trains on the model's own generations."""
    from tests.conftest import run_teacher_recipe

    prompts = ["The module", "A list of", "Files are", "Write a", "In Python", "The result", "Each row", "When the"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    run, art = run_teacher_recipe(tmp_path, "datafree", tiny_teacher_dir, """\
  - {type: qat, steps: 2, batch_size: 2, loss_chunk: 16, baselines: [], sequence_kd: {prompts: prompts.jsonl, max_new_tokens: 40, temperature: 1.0, drop_truncated: false}}
  - {type: export, formats: [f16, q4_k_m]}
""")
    data = art["qat"]["metrics"]["data"]
    assert data["source"] == "teacher generations" and data["rows"] >= 2
    answers = [json.loads(line) for line in next(run.glob("stages/*-qat/sequence_kd.jsonl")).read_text().splitlines()]
    assert {a["prompt"] for a in answers} <= set(prompts) and len(answers) >= 4 and all(a["response"] for a in answers)
    assert art["export"]["metrics"]["gguf_q4_k_m"]["writer"] == "edgekit (QAT grid)"
