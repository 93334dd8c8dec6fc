"""The evaluate stage on a general set (a folder of JSONL subsets): every model on each subset,
with llama-perplexity's KL statistics, and the report's tables of them."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_evaluate_stage_scores_every_model_on_each_general_subset(tiny_teacher_dir, tmp_path):
    from tests.conftest import corpus_texts, run_teacher_recipe

    general = tmp_path / "general"
    general.mkdir()
    texts = corpus_texts(40)[30:]
    for name, part in (("prose", texts[:5]), ("other", texts[5:])):
        (general / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    run, art = run_teacher_recipe(tmp_path, "gen", tiny_teacher_dir, """\
  - {type: export, model: teacher, formats: [f16, q4_k_m]}
  - {type: evaluate, max_tokens: 128, ctx: 32, baselines: [teacher], general: general}
  - {type: report}
""")
    g = art["evaluate"]["metrics"]["general"]
    assert set(g) == {"prose", "other"}
    for sub in g.values():
        q4, f16 = sub["gguf_q4_k_m|teacher"], sub["gguf_f16|teacher"]
        assert sub["teacher"]["tokens"] == 4 * 31
        assert q4["kld_max"] >= q4["kld_p999"] >= q4["kld_p99"] >= q4["kld_median"] >= 0
        assert q4["kl"] > 10 * f16["kl"] and q4["top1"] <= f16["top1"]  # 4-bit loses more than 16-bit, on every subset
    report = (run / "report.md").read_text()
    assert "General text: prose" in report and "General text: other" in report and "KL p99.9" in report
