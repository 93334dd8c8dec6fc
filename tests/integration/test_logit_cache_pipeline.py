"""Whole-pipeline tests of logit_cache on tiny models (moved from tests/unit/test_logit_cache.py, whose
fixtures they share): each runs `edgekit run` end to end."""

import json
import pytest
from edgekit.cli import main

from tests.unit.test_logit_cache import cache_home  # noqa: F401  (fixtures and helpers)

pytestmark = pytest.mark.integration


def test_offline_recipe_builds_once_then_reuses(tiny_recipe, tmp_path, cache_home):
    text = tiny_recipe.read_text().replace("{type: distill, steps: 4,",
                                           "{type: distill, steps: 2, teacher_logits: offline, top_k: 8,")
    text = text.replace("[f16, q8_0, onnx_int4]", "[f16]")
    tiny_recipe.write_text(text)
    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "tiny" / "manifest.json").read_text())["artifacts"]["distill"]["metrics"]
    info = first["teacher_logits"]
    assert info["mode"] == "offline" and not info["reused"]
    assert info["bytes_per_token"] == 8 * (2 + 2) and info["full_fp32_bytes_per_token"] > 100 * info["bytes_per_token"] / 8
    files = list((cache_home / "teacher-logits").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    # another student (every layer kept), same teacher and data: the cache is read, not rebuilt
    tiny_recipe.write_text(text.replace("keep_every: 2", "keep_every: 1"))
    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "tiny" / "manifest.json").read_text())["artifacts"]["distill"]["metrics"]
    assert second["teacher_logits"]["reused"] and files[0].stat().st_mtime_ns == stamp
    assert second["final"]["kd"] > 0
    # a damaged cache file is rebuilt, not trusted
    files[0].write_bytes(b"not a safetensors file")
    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path / "c")]) == 0
    third = json.loads((tmp_path / "c" / "tiny" / "manifest.json").read_text())["artifacts"]["distill"]["metrics"]
    assert not third["teacher_logits"]["reused"] and third["final"]["loss"] == pytest.approx(second["final"]["loss"], rel=1e-3)

