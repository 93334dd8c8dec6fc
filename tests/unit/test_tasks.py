"""Task accuracy (edgekit.bench.tasks) and `edgekit eval` on GGUF files and ONNX folders."""

import json
import shutil

import pytest
import torch

from edgekit.bench.tasks import grade, load_tasks
from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.export.onnx_export import export_onnx_int4

from tests.conftest import corpus_texts

BAD = {
    "not-json": ("{prompt", "is not valid JSON"),
    "no-answer": ('{"prompt": "x"}', "needs a string 'prompt' and an 'answer'"),
    "one-choice": ('{"prompt": "x", "choices": ["a"], "answer": 0}', "at least two"),
    "answer-not-a-choice": ('{"prompt": "x", "choices": ["a", "b"], "answer": "c"}', "is not one of the choices"),
    "index-out-of-range": ('{"prompt": "x", "choices": ["a", "b"], "answer": 2}', "not an index"),
    "em-number": ('{"prompt": "x", "answer": 4}', "needs a string answer"),
    "empty": ("\n", "holds no items"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_task_files_name_the_problem(tmp_path, case):
    text, msg = BAD[case]
    (tmp_path / "t.jsonl").write_text(text)
    with pytest.raises(EdgekitError, match=msg):
        load_tasks(tmp_path / "t.jsonl")


def test_shipped_task_set_loads():
    from pathlib import Path

    items = load_tasks(Path(__file__).parents[2] / "recipes" / "data" / "tasks_python.jsonl")
    assert sum("choices" in it for it in items) == 40 and sum("choices" not in it for it in items) == 12


def _char_model(prefer: str):
    """A character-level 'model' over bytes whose next-token distribution puts most of its
    mass on the characters of `prefer`: enough to check the grading arithmetic."""
    def encode(text):
        return list(text.encode())

    def decode(ids):
        return bytes(ids).decode(errors="replace")

    def scorer(row):
        logits = torch.zeros(len(row), 256)
        logits[:, list(prefer.encode())] = 5.0
        return logits

    return encode, decode, scorer


def test_grade_counts_multiple_choice_and_exact_match():
    items = [{"prompt": "Q:", "choices": [" ab", " zz"], "answer": 0},  # the preferred letters win
             {"prompt": "Q:", "choices": [" ab", " zz"], "answer": 1},
             {"prompt": "Q:", "choices": [" a", " b", " q"], "answer": 2},
             {"prompt": "say", "answer": "x"}]
    encode, decode, likes_ab = _char_model(" ab\n")
    _, _, likes_z = _char_model(" z\n")
    g = grade(items, {"ab": likes_ab, "z": likes_z}, encode, decode, max_new_tokens=3)
    assert g["ab"]["mc_items"] == 3 and g["ab"]["acc"] == pytest.approx(1 / 3)
    assert g["z"]["acc"] == pytest.approx(1 / 3)  # " zz" right on item 2, wrong elsewhere
    assert g["chance"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert g["ab"]["em_items"] == 1 and g["ab"]["exact_match"] == 0.0

    def says_x(row):  # "x", then a newline
        logits = torch.zeros(len(row), 256)
        for i, t in enumerate(row.tolist()):
            logits[i, ord("\n") if t == ord("x") else ord("x")] = 5.0
        return logits

    assert grade(items[3:], {"x": says_x}, encode, decode)["x"]["exact_match"] == 1.0

    seen = []

    def records(row):  # every row the grader scores starts with the model's BOS
        seen.append(row.tolist())
        return likes_ab(row)

    g_bos = grade(items, {"ab": records}, encode, decode, max_new_tokens=3, bos=0)
    assert seen and all(r[0] == 0 and r[1:3] in ([ord("Q"), ord(":")], [ord("s"), ord("a")]) for r in seen)
    assert g_bos["ab"]["acc"] == pytest.approx(1 / 3)  # same items, same answers (this model ignores context)


@pytest.fixture
def files(tiny_bundle):
    return tiny_bundle


def test_eval_cli_on_gguf_and_onnx_with_tasks_and_reference(files, tmp_path, capsys):
    data = tmp_path / "hold.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(3)))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "The module", "choices": [" reads", " writes", " files"], "answer": 0},
        {"prompt": "A function", "choices": [" returns", " value"], "answer": " value"},
        {"prompt": "The file", "answer": "is"}]))
    gguf, onnx = files / "tiny-F16.gguf", files / "tiny-int4-onnx"
    assert main(["eval", str(gguf), str(onnx), "--data", str(data), "--tasks", str(tasks), "--reference", str(gguf),
                 "--ctx", "32", "--max-tokens", "64", "--out", str(tmp_path / "out"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in results] == ["llama.cpp", "onnxruntime"]
    same, onnx_r = results
    assert same["kl_vs_reference"] < 1e-6 and same["tasks"]["file"] == same["tasks"]["reference"]
    assert same["tasks"]["chance"] == pytest.approx(5 / 12)
    assert 0 < onnx_r["kl_vs_reference"] < 5 and onnx_r["tokens"] == same["tokens"]  # the same ids from both tokenizers
    assert onnx_r["tasks"]["file"]["mc_items"] == 2 and onnx_r["tasks"]["file"]["em_items"] == 1
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"eval.json", "eval.md", "quality_vs_size.png"}
    assert "tiny-int4-onnx | - | onnxruntime" in (tmp_path / "out" / "eval.md").read_text()  # "-": the whole --data file, no subset


def test_eval_needs_data_or_tasks(files, capsys):
    assert main(["eval", str(files / "tiny-F16.gguf")]) == 2
    assert "pass --data" in capsys.readouterr().err


def test_onnx_export_repairs_a_gguf_imported_tokenizer(tiny_teacher_dir, tmp_path):
    """transformers' GGUF import leaves SentencePiece settings on byte-level vocabularies;
    ONNX Runtime's tokenizer then maps words to -1. The export drops them and checks the ids."""
    from transformers import AutoTokenizer

    import onnxruntime_genai as og

    src = tmp_path / "src"
    shutil.copytree(tiny_teacher_dir, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<|endoftext|>")
    tok["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"},
                                                       {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                       {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                        "use_regex": True}]}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    text = "The module reads files and returns a value."
    want = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False)["input_ids"]
    out = export_onnx_int4(src, tmp_path / "m-int4-onnx")
    got = [int(i) for i in og.Tokenizer(og.Model(str(out))).encode(text)]
    assert got == want
    assert not json.loads((out / "tokenizer.json").read_text())["model"]["byte_fallback"]
