"""Whole-pipeline tests of ptq on tiny models (moved from tests/unit/test_ptq.py, whose
fixtures they share): each runs `edgekit run` end to end."""

import json
import pytest
import torch

from tests.unit.test_ptq import wide_teacher  # noqa: F401  (fixtures and helpers)

pytestmark = pytest.mark.integration


def test_quantize_stage_end_to_end(wide_teacher, tmp_path):
    """GPTQ and AWQ checkpoints load with plain transformers; GPTQ/AWQ GGUFs run in llama.cpp
    and match PyTorch on their own grid; GPTQ on the Q4_0 grid beats llama.cpp's Q4_0 rounding."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_teacher_recipe

    run, art = run_teacher_recipe(tmp_path, "tq", wide_teacher, """\
  - {type: quantize, model: teacher, calibration_rows: 16, awq_grid: 4, gguf: [q4_k_m, q4_0]}
  - {type: export, model: teacher, formats: [f16, q4_0]}
  - {type: evaluate, max_tokens: 256, ctx: 32}
  - {type: report, sample_tokens: 4}
""", docs=30)
    q, ev = art["quantize"]["metrics"], art["evaluate"]["metrics"]
    for method in ("gptq", "awq"):
        ckpt = run / "export" / f"tq-teacher-{method}"
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
        model = AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers, as users load it
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
        assert q[method]["size_mb"] < 0.6 * (run / "export" / "tq-teacher-F16.gguf").stat().st_size / 2**20
        for mix in ("q4_k_m", "q4_0"):
            g = q[f"{method}_gguf_{mix}"]
            assert (run / "export" / g["file"]).is_file()
            # a mis-packed tensor would put the file as far from its PyTorch grid as from the source
            assert g["parity_vs_pytorch_grid"]["kl"] < 0.2 * g["vs_source"]["kl"], g
    assert ev["gptq_gguf_q4_0|teacher"]["kl"] < ev["gguf_q4_0|teacher"]["kl"], ev
    bundle = (run / "export" / "README.md").read_text()  # app developers learn what the PTQ files are
    assert "## GPTQ / AWQ" in bundle and "`tq-teacher-gptq` (folder)" in bundle and "tq-teacher-awq-Q4_0.gguf" in bundle
    report = (run / "report.md").read_text()
    assert "Post-training quantization (GPTQ / AWQ)" in report and "GPTQ on the GGUF grid" in report

