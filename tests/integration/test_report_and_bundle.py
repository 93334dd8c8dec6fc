"""What a user gets from a run, used as a user would: the report's HTML opened in a real
headless Chromium (Debian's chromium-headless-shell), the bundle README's code snippets run
as written inside the bundle, and the examples/ app embedding the bundle."""

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from edgekit.bench.llama_runner import cpu_has_amx
from edgekit.cli import main

from tests.conftest import write_tiny_recipe

pytestmark = pytest.mark.integration  # whole pipelines on tiny models

REPO = Path(__file__).resolve().parents[2]

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
CHECK = ("<script>addEventListener('load', () => { const imgs = [...document.images];"
         " const ok = imgs.filter(i => i.complete && i.naturalWidth > 0);"
         " const d = document.createElement('div'); d.id = 'plot-check';"
         " d.textContent = ok.length + '/' + imgs.length; document.body.appendChild(d); });</script>")


def browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not found:
        pytest.skip("no Chromium here: `make test` installs Debian's chromium-headless-shell when it can (root + apt)")
    return found


def chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tiny_teacher_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("userrun")
    recipe = write_tiny_recipe(folder, tiny_teacher_dir)
    (folder / "tasks.jsonl").write_text('{"prompt": "The module", "choices": [" reads", " files"], "answer": 0}\n'
                                        '{"prompt": "A function", "answer": "returns"}\n')
    recipe.write_text(recipe.read_text().replace("steps: 4,", "steps: 2,").replace("[f16, q8_0, onnx_int4]", "[q8_0, onnx_int4]")
                      .replace("{type: evaluate, max_tokens: 64, ctx: 32}", "{type: evaluate, max_tokens: 64, ctx: 32, tasks: tasks.jsonl}"))
    assert main(["run", str(recipe), "--runs-dir", str(folder / "runs")]) == 0
    return folder / "runs" / "tiny"


def test_report_html_renders_its_plots_in_chromium(run_dir, tmp_path):
    exe = browser()
    html = run_dir / "report.html"
    page = html.read_text()
    n_plots = page.count("data:image/png;base64,")
    assert n_plots == 2  # quality against size, decode speed
    probe = tmp_path / "probe.html"  # the report plus a probe script; the report itself is left as written
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    dom = chromium(exe, "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'<div id="plot-check">{n_plots}/{n_plots}</div>' in dom.stdout
    assert "edgekit run report: tiny" in dom.stdout
    assert "Task accuracy" in dom.stdout and "Chance on the multiple choice: 50.0%" in dom.stdout
    shot = tmp_path / "report.png"
    r = chromium(exe, f"--screenshot={shot}", "--window-size=1000,1400", html.as_uri())
    assert r.returncode == 0 and shot.is_file()
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    lo, hi = pixels.getextrema()
    assert hi - lo > 100  # painted text and plots, not a blank page


def test_bundle_readme_snippets_run_as_written(run_dir):
    """Every Python snippet of the bundle's README, run inside the bundle (the HTTP-client one
    needs `edgekit serve` running: tests/unit/test_serve.py speaks that protocol)."""
    bundle = run_dir / "export"
    snippets = re.findall(r"```python\n(.*?)```", (bundle / "README.md").read_text(), re.S)
    runnable = [s for s in snippets if "base_url=" not in s]
    assert len(runnable) == 3  # llama-cpp-python, onnxruntime-genai, edgekit.runtime
    if cpu_has_amx():  # plain llama-cpp-python 0.3.36 segfaults in its AMX matmul (the README says so)
        warnings.warn("this CPU has AMX: the plain llama-cpp-python snippet is not run")
        runnable = [s for s in runnable if "from llama_cpp import Llama" not in s]
    for code in runnable:
        proc = subprocess.run([sys.executable, "-c", code], cwd=bundle, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{code}\n{proc.stderr[-2000:]}"


def test_example_app_embeds_the_bundle(run_dir):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "docs_helper.py"), str(run_dir / "export"),
                           "What does the module read?", "--max-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[llama.cpp, tiny-student-Q8_0.gguf:" in proc.stderr
