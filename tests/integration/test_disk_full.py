"""Disk full during export (simulated with RLIMIT_FSIZE: writes past the limit fail with
EFBIG): a clear error, exit 2, no half-written file published, the earlier run intact."""

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO
import pytest

pytestmark = pytest.mark.integration  # whole pipelines on tiny models


def test_disk_full_during_export(tiny_recipe, tmp_path):
    runs = tmp_path / "runs"
    text = tiny_recipe.read_text().replace("[f16, q8_0, onnx_int4]", "[f16]")
    text = text.replace("  - {type: bench, prompt_tokens: 8, gen_tokens: 4, repeats: 1}\n", "")
    tiny_recipe.write_text(text)
    ok = subprocess.run([sys.executable, "-m", "edgekit.cli", "run", str(tiny_recipe), "--runs-dir", str(runs)],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = {p: p.read_bytes() for p in (runs / "tiny" / "export").iterdir()}
    # the next run re-exports as f32 (bigger than the limit) under a 300 kB file-size limit (the F32 file is ~540 kB)
    tiny_recipe.write_text(text.replace("formats: [f16]", "formats: [f32]"))
    limited = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        from edgekit.cli import main
        sys.exit(main(["run", {str(tiny_recipe)!r}, "--runs-dir", {str(runs)!r}]))
    """)
    full = subprocess.run([sys.executable, "-c", limited], cwd=REPO, capture_output=True, text=True)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "no room to write" in full.stderr and "Traceback" not in full.stderr
    assert {p: p.read_bytes() for p in (runs / "tiny" / "export").iterdir()} == before
    assert not [p for p in (runs / "tiny" / "export").iterdir() if "F32" in p.name]
    manifest = json.loads((runs / "tiny" / "manifest.json").read_text())  # still whole JSON
    assert "export" not in manifest["artifacts"] or manifest["artifacts"]["export"]["config"]["formats"] == ["f16"]
    assert not list((runs / "tiny" / "stages").glob("*-export/*F32*"))  # nothing half-written was finished
