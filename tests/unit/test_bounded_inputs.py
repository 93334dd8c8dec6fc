"""Inputs are bounded before they are used: YAML without aliases and within size, depth and
string-length caps; JSONL lines capped and decoded strictly; GGUF headers whose counts cannot
fit their file; NaN/Inf weights; symlinks out of the run directory; two runs on one
directory. Each: exit 2, one line, no traceback, in bounded time."""

import json
import struct
import time
from pathlib import Path

import pytest

from edgekit.cli import main
from tests.unit.test_bad_inputs import BASE, DOCS

BILLION_LAUGHS = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)) + "name: *a9\n"


def refused(capsys, argv, expect: str, seconds: float = 10.0) -> str:
    t0 = time.monotonic()
    assert main(argv) == 2
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err and len(err) < 2000, err[:3000]
    assert elapsed < seconds, elapsed
    return err


@pytest.mark.parametrize("text,expect", [
    (BILLION_LAUGHS, "YAML alias '*a0' is not accepted"),
    ("name: t\nstages: " + "[" * 200 + "]" * 200 + "\n", "nested more than 32 levels"),
    ("name: '" + "x" * 200_000 + "'\n", "a value of 200,000 characters"),
    ("name: t\nname: u\n", "key 'name' appears twice"),
    ("x" * (2 << 20), "is 2,097,152 bytes"),
    ("", "must be a mapping"),
])
def test_recipe_bombs_are_refused_at_once(text, expect, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    refused(capsys, ["validate", str(recipe)], expect, seconds=5.0)


def test_long_values_are_cut_in_messages(tiny_teacher_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    (tmp_path / "d.jsonl").write_text(DOCS)
    recipe.write_text(BASE.replace("{teacher}", str(tiny_teacher_dir)).replace(
        "  - {type: report}", "  - type: report\n    ? " + "k" * 50_000 + "\n    : 1\n    sample_tokens: '" + "9" * 60_000 + "'"))
    err = refused(capsys, ["validate", str(recipe)], "more characters")
    assert "unknown key" in err


def test_overrides_are_bounded_too(tiny_teacher_dir, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(DOCS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("{teacher}", str(tiny_teacher_dir)))
    refused(capsys, ["validate", str(recipe), "seed=&a [*a]"], "alias")


@pytest.mark.parametrize("content,expect", [
    (b'{"text": "fine"}\n{"text": broken\n', "d.jsonl:2 is not valid JSON"),
    (b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', "d.jsonl:2 is not UTF-8"),
    (b'{"text": "' + b"x" * (17 << 20) + b'"}\n', "d.jsonl:1 is longer than 16 MB"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    (b"", "has no non-empty documents"),
])
def test_bad_jsonl_data_is_refused_with_its_line(content, expect, tiny_gguf_path, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(content)
    refused(capsys, ["eval", str(tiny_gguf_path), "--data", str(tmp_path / "d.jsonl")], expect)


@pytest.fixture(scope="module")
def tiny_gguf_path(tmp_path_factory, tiny_teacher_dir) -> Path:
    from edgekit.export.gguf_write import write_gguf

    return write_gguf(tiny_teacher_dir, tmp_path_factory.mktemp("g") / "tiny-F16.gguf", "f16")


def test_gguf_truncated_at_many_offsets(tiny_gguf_path, tmp_path, capsys):
    data = tiny_gguf_path.read_bytes()
    cuts = sorted({0, 3, 4, 23, 24, 25, 100, 1000, 5000, 20_000, 100_000, len(data) // 2, len(data) - 1}
                  | set(range(30, 60_000, 4111)))
    for n in cuts:
        if n >= len(data):
            continue
        (tmp_path / "x.gguf").write_bytes(data[:n])
        refused(capsys, ["inspect", str(tmp_path / "x.gguf")], "x.gguf", seconds=4.0)


@pytest.mark.parametrize("header,expect", [
    (struct.pack("<4sIQQ", b"GGUF", 3, 2**62, 1), "claims 4,611,686,018,427,387,904 tensors"),
    (struct.pack("<4sIQQ", b"GGUF", 3, 1, 2**40), "metadata keys"),
    (struct.pack("<4sIQQ", b"GGUF", 7, 1, 1), "version 7"),
    # one key whose string length claims 2**60 bytes
    (struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", 4) + b"name" + struct.pack("<IQ", 8, 2**60),
     "corrupt or truncated"),
    # one tensor of an unknown GGML type code (99)
    (struct.pack("<4sIQQ", b"GGUF", 3, 1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 99, 0),
     "corrupt or truncated"),
    # one key of an unknown value type
    (struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", 4) + b"name" + struct.pack("<I", 99) + b"\0" * 16,
     "corrupt or truncated"),
])
def test_gguf_header_bombs(header, expect, tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(header + b"\0" * 64)
    for cmd in (["inspect"], ["bench", "--gen-tokens", "2", "--prompt-tokens", "4"]):
        refused(capsys, [*cmd, str(tmp_path / "x.gguf")], expect, seconds=4.0)


def test_nan_weights_are_refused(tiny_teacher_dir, tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from edgekit.export.gguf_write import write_gguf

    bad = tmp_path / "bad-model"
    bad.mkdir()
    for f in tiny_teacher_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(bad / "model.safetensors"))
    key = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[key][0, 0] = np.nan
    save_file(weights, str(bad / "model.safetensors"))
    gguf = write_gguf(bad, tmp_path / "bad-F16.gguf", "f16")
    refused(capsys, ["inspect", str(gguf)], "hold NaN or infinite values")
    (tmp_path / "d.jsonl").write_text('{"text": "some held-out text about lists and files"}\n')
    refused(capsys, ["eval", str(gguf), "--data", str(tmp_path / "d.jsonl"), "--ctx", "8"], "NaN or infinite logits")


@pytest.mark.parametrize("case", ["missing-onnx", "corrupt-config", "config-not-json"])
def test_broken_onnx_folders(case, tmp_path, capsys, tiny_gguf_path):
    folder = tmp_path / "m-onnx"
    folder.mkdir()
    if case != "config-not-json":
        (folder / "genai_config.json").write_text(json.dumps({"model": {"type": "llama"}}) if case == "corrupt-config" else "{}")
    else:
        (folder / "genai_config.json").write_bytes(b"\xff{not json")
    if case != "missing-onnx":
        (folder / "model.onnx").write_bytes(b"\x08\x07")
    (tmp_path / "d.jsonl").write_text('{"text": "held-out text"}\n')
    for argv in (["eval", str(folder), "--data", str(tmp_path / "d.jsonl")],
                 ["bench", str(folder), "--gen-tokens", "2", "--prompt-tokens", "4"]):
        refused(capsys, argv, "m-onnx")


@pytest.mark.parametrize("header", [b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}',
                                    b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}'])
def test_safetensors_with_a_lying_header(header, tmp_path, capsys):
    f = tmp_path / "m.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    refused(capsys, ["inspect", str(f)], "safetensors")
    huge = tmp_path / "h.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    refused(capsys, ["inspect", str(huge)], "safetensors")


def test_a_link_out_of_the_run_directory_is_refused(tiny_teacher_dir, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(DOCS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("{teacher}", str(tiny_teacher_dir)))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "data").symlink_to(outside)
    refused(capsys, ["run", str(recipe), "--runs-dir", str(tmp_path / "runs")], "a link to")
    assert list(outside.iterdir()) == []


def test_two_runs_cannot_share_a_directory(tiny_teacher_dir, tmp_path, capsys):
    """A second `edgekit run` on a directory in use is refused at once; the lock dies with its
    holder, so a crashed run never leaves it stuck."""
    import subprocess
    import sys

    (tmp_path / "d.jsonl").write_text(DOCS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("{teacher}", str(tiny_teacher_dir)))
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from edgekit.fsutil import exclusive_lock\n"
                               f"with exclusive_lock(Path({str(run_dir)!r}), 'run directory'):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(capsys, ["run", str(recipe), "--runs-dir", str(tmp_path / "runs")], f"in use by another edgekit process (pid {holder.pid})")
    finally:
        holder.kill()  # as a crash would
        holder.wait()
    assert main(["validate", str(recipe)]) == 0
    from edgekit.fsutil import exclusive_lock

    with exclusive_lock(run_dir, "run directory"):  # free again
        pass
