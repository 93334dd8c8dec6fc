"""The bad-input corpus (tests/bad_inputs/recipes.yaml + the file cases below): every case
fails with exit code 2, a one-line error naming the problem, no traceback, and leaves what
was already in the run directory untouched."""

from pathlib import Path

import pytest
import yaml

from edgekit.cli import main

CORPUS = yaml.safe_load((Path(__file__).parents[1] / "bad_inputs" / "recipes.yaml").read_text())
BASE = """name: t
teacher: {model: {teacher}}
student: {init: teacher_layers, keep_every: 2}
data: {train: d.jsonl, holdout_fraction: 0.3, seq_len: 16}
stages:
  - {type: distill, steps: 2, batch_size: 2, loss_chunk: 16}
  - {type: export, formats: [f16]}
  - {type: evaluate, max_tokens: 32, ctx: 16}
  - {type: report}
"""
DOCS = "".join(f'{{"text": "document number {i} about files, lists and dictionaries in python"}}\n' for i in range(8))


def test_corpus_is_large_enough():
    assert len(CORPUS) + len(FILE_CASES) >= 40


def check_failure(capsys, argv, expect, runs=None):
    sentinel = None
    if runs is not None:  # a finished artifact from an earlier run must survive the failed run
        sentinel = runs / "t" / "export" / "earlier-F16.gguf"
        sentinel.parent.mkdir(parents=True, exist_ok=True)
        sentinel.write_bytes(b"GGUF earlier artifact")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err
    if sentinel is not None:
        assert sentinel.read_bytes() == b"GGUF earlier artifact"


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_bad_recipe(case, tiny_teacher_dir, tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "d.jsonl").write_text(case.get("data", DOCS))
    text = case.get("text", BASE)
    pairs = case.get("replace", [])
    for old, new in zip(pairs[::2], pairs[1::2]):  # [old, new, old, new, ...]
        text = text.replace(old, new)
    text = (text.replace("{teacher}", str(tiny_teacher_dir)).replace("{empty_dir}", str(tmp_path / "empty_model"))
            .replace("{data_file}", str(tmp_path / "d.jsonl")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    if case.get("cmd", "validate") == "validate":
        check_failure(capsys, ["validate", str(recipe)], case["expect"])
    else:
        runs = tmp_path / "runs"
        check_failure(capsys, ["run", str(recipe), "--runs-dir", str(runs)], case["expect"], runs)


def _gguf_bytes(tiny_gguf: Path, n: int) -> bytes:
    return tiny_gguf.read_bytes()[:n]


FILE_CASES = {
    # id: (file name, how to make it (tmp_path, tiny_gguf) -> None, command, expected text)
    "zero-byte-gguf": ("x.gguf", lambda p, g: (p / "x.gguf").write_bytes(b""), "inspect", "x.gguf"),
    "truncated-gguf": ("x.gguf", lambda p, g: (p / "x.gguf").write_bytes(_gguf_bytes(g, 3000)), "inspect", "x.gguf"),
    "random-bytes-gguf": ("x.gguf", lambda p, g: (p / "x.gguf").write_bytes(bytes(range(256)) * 8), "inspect", "x.gguf"),
    "directory-named-gguf": ("x.gguf", lambda p, g: (p / "x.gguf").mkdir(), "inspect", "x.gguf"),
    "missing-file": ("nope.gguf", lambda p, g: None, "inspect", "does not exist"),
    "corrupt-safetensors": ("m.safetensors", lambda p, g: (p / "m.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"),
                            "inspect", "not a readable safetensors"),
    "zero-byte-safetensors": ("m.safetensors", lambda p, g: (p / "m.safetensors").write_bytes(b""), "inspect",
                              "not a readable safetensors"),
    "truncated-onnx": ("m.onnx", lambda p, g: (p / "m.onnx").write_bytes(b"\x08\x07\x12\x05onnx"), "inspect",
                       "not a readable ONNX"),
    "bench-corrupt-gguf": ("x.gguf", lambda p, g: (p / "x.gguf").write_bytes(_gguf_bytes(g, 3000)), "bench", "x.gguf"),
    "eval-corrupt-gguf": ("x.gguf", lambda p, g: (p / "x.gguf").write_bytes(_gguf_bytes(g, 3000)), "eval", "x.gguf"),
    "eval-broken-onnx-folder": ("m-onnx", lambda p, g: ((p / "m-onnx").mkdir(), (p / "m-onnx" / "genai_config.json").write_text("{}"),
                                                          (p / "m-onnx" / "model.onnx").write_bytes(b"\x08\x07garbage")),
                                "eval", "ONNX Runtime could not load"),
    "eval-folder-not-a-model": ("plain-dir", lambda p, g: (p / "plain-dir").mkdir(), "eval", "not an onnxruntime-genai model folder"),
    "eval-bad-task-file": ("t.jsonl", lambda p, g: (p / "t.jsonl").write_text('{"prompt": "x", "choices": ["a"], "answer": 0}\n'),
                           "eval-tasks", "at least two"),
    "validate-missing-recipe": ("none.yaml", lambda p, g: None, "validate", "none.yaml"),
    "validate-directory-as-recipe": ("dir.yaml", lambda p, g: (p / "dir.yaml").mkdir(), "validate", "dir.yaml"),
}


@pytest.fixture(scope="module")
def tiny_gguf_file(tmp_path_factory, tiny_teacher_dir) -> Path:
    from edgekit.export.gguf_write import write_gguf

    return write_gguf(tiny_teacher_dir, tmp_path_factory.mktemp("g") / "tiny-F16.gguf", "f16")


@pytest.mark.parametrize("case", list(FILE_CASES), ids=list(FILE_CASES))
def test_bad_file(case, tmp_path, tiny_gguf_file, capsys):
    name, make, cmd, expect = FILE_CASES[case]
    make(tmp_path, tiny_gguf_file)
    tiny_gguf = tiny_gguf_file
    argv = {"inspect": ["inspect", str(tmp_path / name)], "validate": ["validate", str(tmp_path / name)],
            "bench": ["bench", str(tmp_path / name), "--gen-tokens", "2", "--prompt-tokens", "4"],
            "eval": ["eval", str(tmp_path / name), "--data", str(tmp_path / "d.jsonl")],
            "eval-tasks": ["eval", str(tiny_gguf), "--tasks", str(tmp_path / name)]}[cmd]
    (tmp_path / "d.jsonl").write_text('{"text": "some held-out text"}\n')
    check_failure(capsys, argv, expect)


def test_teacher_student_vocabulary_mismatch(tiny_teacher_dir, tmp_path, capsys):
    """A student with another tokenizer cannot learn from the teacher's logits: named, with the way out."""
    from tests.conftest import other_vocab_student

    student = other_vocab_student(tmp_path)
    (tmp_path / "d.jsonl").write_text(DOCS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.replace("{teacher}", str(tiny_teacher_dir)).replace(
        "student: {init: teacher_layers, keep_every: 2}", f"student: {{init: model, model: {student}}}"))
    runs = tmp_path / "runs"
    check_failure(capsys, ["run", str(recipe), "--runs-dir", str(runs)], "different vocabularies", runs)
