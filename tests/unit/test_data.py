import json

import pytest
import torch

from edgekit.data.documents import Document, load_documents, ngram_overlap, split_documents
from edgekit.errors import EdgekitError


def test_jsonl_formats(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"text": "plain"}, {"prompt": "q", "response": "a"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"text": "plain"},  # exact duplicate: dropped
    ]))
    docs = load_documents("d.jsonl", tmp_path)
    assert len(docs) == 3
    assert docs[1].messages == (("user", "q"), ("assistant", "a"))


def test_bad_rows_are_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(EdgekitError, match=r"d.jsonl:2: no 'text'"):
        load_documents("d.jsonl", tmp_path)
    (tmp_path / "e.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(EdgekitError, match=r"e.jsonl:2 is not valid JSON"):
        load_documents("e.jsonl", tmp_path)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(EdgekitError, match="no non-empty documents"):
        load_documents("empty.jsonl", tmp_path)
    (tmp_path / "t.txt").write_text("")
    with pytest.raises(EdgekitError, match="no non-empty documents"):
        load_documents("t.txt", tmp_path)


def test_split_is_by_document_deterministic_and_stable():
    docs = [Document(text=f"document number {i} " * 5) for i in range(50)]
    train, hold = split_documents(docs, 0.2, seed=0)
    assert len(hold) == 10 and len(train) == 40
    assert not {d.key for d in train} & {d.key for d in hold}
    assert split_documents(docs, 0.2, seed=0) == (train, hold)
    assert split_documents(docs, 0.2, seed=1)[1] != hold
    # adding documents never moves an old holdout document into training
    more = docs + [Document(text=f"new {i} " * 5) for i in range(50)]
    _, hold2 = split_documents(more, 0.2, seed=0)
    assert {d.key for d in hold} <= {d.key for d in hold2} or len({d.key for d in hold} - {d.key for d in hold2}) <= 2


def test_split_needs_two_documents():
    with pytest.raises(EdgekitError, match="at least 2"):
        split_documents([Document(text="x")], 0.1, 0)


def test_ngram_overlap_detects_leaked_text():
    text = " ".join(f"w{i}" for i in range(40))
    assert ngram_overlap(["other words entirely " * 5], [text]) == 0.0
    assert ngram_overlap([text], [text]) == 1.0


def test_rows_start_with_bos_where_the_tokenizer_asks_for_one(tiny_tokenizer_dir, tmp_path):
    """A GGUF that says add_bos_token (Gemma, Llama) gets a tokenizer that puts BOS first, and
    packed rows then start with BOS (as llama.cpp feeds such a model); others are unchanged."""
    import shutil

    from transformers import AutoTokenizer

    from edgekit.data.tokens import pack, row_start_bos
    from edgekit.models.sources import add_bos

    docs = [Document(text=f"document {i}: the quick brown fox jumps over the lazy dog") for i in range(8)]
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert row_start_bos(plain) is None
    ids, mask = pack(docs, plain, 16, "train")

    d = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, d)
    bos = plain.convert_tokens_to_ids("<|endoftext|>")
    meta = {"tokenizer.ggml.add_bos_token": ["BOOL", None, True], "tokenizer.ggml.bos_token_id": ["UINT32", None, bos],
            "tokenizer.ggml.tokens": ["ARRAY", "STRING", plain.convert_ids_to_tokens(list(range(len(plain))))]}
    add_bos(d, meta)
    tok = AutoTokenizer.from_pretrained(d)
    assert tok("hello")["input_ids"] == [bos] + plain("hello")["input_ids"]
    assert row_start_bos(tok) == bos
    rows, keep = pack(docs, tok, 16, "train")
    assert rows.shape[1] == 16 and (rows[:, 0] == bos).all() and not keep[:, 0].any()
    stream = ids.flatten().tolist()
    assert rows[:, 1:].flatten().tolist() == stream[: rows.shape[0] * 15]  # the same text, 15 tokens a row


def test_weighted_documents_are_packed_k_times_and_the_holdout_is_not(tiny_teacher_dir, tmp_path):
    """data.weights ({FIELD: {VALUE: k}}) packs matching training documents k times; a row's own
    `weight` wins; the split is the unweighted one (weights never move a document into the
    holdout), the holdout is written unweighted, and a bad weight is named with its line."""
    from edgekit.pipeline import prepare_data
    from edgekit.stages import load_recipe
    from edgekit.stages.context import RunContext

    genres = ["chat", "prose", "prose", "code"] * 10
    rows = [{"text": f"{g} document {i}: " + " ".join(f"w{i}x{j}" for j in range(40)), "genre": g}
            for i, g in enumerate(genres)]
    rows[3]["weight"] = 2  # its own weight: wins over the recipe's {code: ...}
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_text = (f"name: w\nteacher: {{model: {tiny_teacher_dir}}}\n"
                   "data: {train: d.jsonl, seq_len: 32, holdout_fraction: 0.2WEIGHTS}\nstages:\n  - {type: distill, steps: 1}\n")
    runs = {}
    for name, weights in (("plain", ""), ("weighted", ", weights: {genre: {chat: 3, code: 5}}")):
        (tmp_path / f"{name}.yaml").write_text(recipe_text.replace("WEIGHTS", weights))
        recipe, base = load_recipe(tmp_path / f"{name}.yaml")
        ctx = RunContext(recipe, base, tmp_path / "runs" / name)
        runs[name] = (ctx, prepare_data(ctx))
    (plain, p_info), (weighted, w_info) = runs["plain"], runs["weighted"]
    assert (plain.run_dir / "data/holdout.jsonl").read_text() == (weighted.run_dir / "data/holdout.jsonl").read_text()
    train = load_documents("train.jsonl", weighted.run_dir / "data")
    by_text = {r["text"]: r for r in rows}
    expected = [by_text[d.text].get("weight") or {"chat": 3, "code": 5}.get(by_text[d.text]["genre"], 1) for d in train]
    assert [d.weight for d in train] == expected and 2 in expected and 3 in expected and 5 in expected
    assert w_info["train_documents_weighted"] == sum(expected)
    assert p_info["train_documents_weighted"] == p_info["train_documents"] + 1  # only the row with its own weight 2
    assert weighted.rows("train").shape[0] > plain.rows("train").shape[0] * 2
    assert torch.equal(weighted.rows("holdout"), plain.rows("holdout"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b", "weight": 0}\n')
    with pytest.raises(EdgekitError, match=r"bad.jsonl:2: weight 0 is not a whole number >= 1"):
        load_documents("bad.jsonl", tmp_path)
    with pytest.raises(EdgekitError, match=r"no row of 'd.jsonl' has genre = 'dialog' \(its values: \['chat', 'code', 'prose'\]"):
        load_documents("d.jsonl", tmp_path, {"genre": {"dialog": 3}})
    (tmp_path / "t.txt").write_text("a\n\nb\n")
    with pytest.raises(EdgekitError, match="plain text"):
        load_documents("t.txt", tmp_path, {"genre": {"x": 2}})


def test_calibration_rows_spread_over_the_whole_split():
    """A calibration sample (GPTQ, importance matrix) is spread over the train split, not its head:
    the general mix lists one genre's documents first, and its first rows are that genre only."""
    from edgekit.data.tokens import spread

    rows = torch.arange(100).repeat_interleave(4).view(100, 4)  # row i holds i
    picked = spread(rows, 5)[:, 0].tolist()
    assert picked == [0, 25, 50, 74, 99]
    assert spread(rows, 100)[:, 0].tolist() == list(range(100))
    assert spread(rows[:3], 8).shape[0] == 3
    assert len(set(spread(rows, 64)[:, 0].tolist())) == 64
