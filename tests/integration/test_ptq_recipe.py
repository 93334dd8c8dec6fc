"""The shipped PTQ recipe on the real embedded SmolLM2 (small overrides): GPTQ and AWQ
checkpoints, GPTQ/AWQ GGUFs, llama.cpp's own Q4_K_M, all measured on one holdout."""

import json
from pathlib import Path

import pytest

from edgekit.cli import main
from edgekit.formats.gguf_read import tensor_table

pytestmark = [pytest.mark.integration, pytest.mark.embedded]  # embedded: uses the user's cache
REPO = Path(__file__).resolve().parents[2]


def test_ptq_recipe_on_smollm2(tmp_path):
    rc = main(["run", str(REPO / "recipes" / "ptq-smollm2.yaml"), "--runs-dir", str(tmp_path), "name=ptq-ci",
               "stages.quantize.calibration_rows=16", "stages.quantize.awq_rows=4", "stages.quantize.awq_grid=3",
               "stages.quantize.parity_rows=2", "stages.export.formats=[f16, q4_k_m]", "stages.evaluate.max_tokens=1024"])
    assert rc == 0
    run = tmp_path / "ptq-ci"
    art = json.loads((run / "manifest.json").read_text())["artifacts"]
    q, ev = art["quantize"]["metrics"], art["evaluate"]["metrics"]
    for key in ("gptq", "awq", "gptq_gguf_q4_k_m", "awq_gguf_q4_k_m"):
        assert (run / "export" / q[key]["file"]).exists(), key
        assert q[key]["vs_source"]["top1"] > 0.6, (key, q[key])  # a broken artifact agrees with almost nothing
    # GPTQ's GGUF keeps llama.cpp's Q4_K_M types (Q5_0 fallbacks for the 576-wide rows included)
    types = {t["type"] for t in tensor_table(run / "export" / q["gptq_gguf_q4_k_m"]["file"])}
    assert {"Q5_0", "Q4_K", "Q6_K"} <= types
    for key in ("gptq_gguf_q4_k_m", "awq_gguf_q4_k_m"):
        assert q[key]["parity_vs_pytorch_grid"]["kl"] < 0.02, q[key]
    # GPTQ on the file's grid beats llama.cpp's own rounding to the same Q4_K_M types, on the holdout
    assert ev["gptq_gguf_q4_k_m|teacher"]["kl"] < ev["gguf_q4_k_m|teacher"]["kl"], ev
