"""Whole-pipeline tests of imatrix on tiny models (moved from tests/unit/test_imatrix.py, whose
fixtures they share): each runs `edgekit run` end to end."""

import numpy as np
import pytest


pytestmark = pytest.mark.integration


def test_export_stage_measures_and_uses_an_importance_matrix(tiny_teacher_dir, tmp_path):
    from tests.conftest import run_teacher_recipe

    run, art = run_teacher_recipe(tmp_path, "im", tiny_teacher_dir, """\
  - {type: export, model: teacher, formats: [f16, q4_k_m], imatrix: true, imatrix_rows: 6}
  - {type: evaluate, max_tokens: 128, ctx: 32, baselines: [teacher]}
""")
    im = art["export"]["metrics"]["imatrix"]
    assert im["rows"] == 6 and im["tokens"] == 6 * 32 and im["used_by"] == ["gguf_q4_k_m"]
    assert (run / "export" / "im-teacher.imatrix.gguf").is_file()  # published beside the files, for llama-quantize
    ev = art["evaluate"]["metrics"]  # the weighted file runs in llama.cpp, scored like any other
    assert np.isfinite(ev["gguf_q4_k_m"]["ppl"]) and 0 < ev["gguf_q4_k_m|teacher"]["kl"] < ev["gguf_q4_k_m"]["nll"]

