"""The general evaluation set: four genres, no overlap with any training set of the recipes."""

import json
from pathlib import Path

from edgekit.data.contamination import check_general_set, ngrams, overlap

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"


def test_four_genres_of_real_size_with_provenance():
    subsets = {f.stem: [json.loads(line) for line in f.read_text().splitlines()] for f in (DATA / "general").glob("*.jsonl")}
    assert set(subsets) == {"narrative", "expository", "dialogue", "code"}
    for name, docs in subsets.items():
        assert all(d["source"] and d["genre"] == name and d["text"].strip() for d in docs)
        assert sum(len(d["text"]) for d in docs) > 35_000, name  # 10k+ tokens each (README: 68,792 SmolLM2 tokens in all)
    readme = (DATA / "general" / "README.md").read_text()
    for licence in ("public domain", "CC BY-SA", "BSD-3-Clause", "MIT"):
        assert licence in readme


def test_no_subset_shares_a_13_gram_with_any_training_set():
    shares = check_general_set(DATA / "general", DATA)
    assert set(next(iter(shares.values()))) >= {"stdlib_docs.jsonl", "general_train.jsonl"}
    assert all(v == 0 for per in shares.values() for v in per.values()), shares


def test_the_check_finds_what_is_shared():
    text = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun all day long"
    assert overlap(text, ngrams(text)) == 1.0
    assert overlap(text, ngrams("an unrelated sentence about something else entirely, with many more words than thirteen")) == 0
    assert 0 < overlap(text + " and then more words follow here to make it longer", ngrams(text)) < 1
