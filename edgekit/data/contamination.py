"""Contamination check: how much of an evaluation text a training set already contains.

The measure is the share of the evaluation text's word 13-grams (lower-cased, punctuation
split off) that occur anywhere in the training text, the n-gram overlap test used for
GPT-3's and Llama's benchmark decontamination. 0 means no 13 consecutive words are shared.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

N = 13
_WORD = re.compile(r"\w+|[^\w\s]")


def ngrams(text: str, n: int = N) -> set[int]:
    words = _WORD.findall(text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


METADATA = ("id", "source", "genre", "sha256", "licence", "license")


def strings_of(path: Path) -> list[str]:
    """Every string value of every line of a JSONL file (texts, chat turns, task prompts), except
    metadata fields (ids, sources), each on its own: no n-gram spans two values."""
    out = []

    def walk(v):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k not in METADATA:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for line in path.read_text().splitlines():
        if line.strip():
            walk(json.loads(line))
    return out


def grams_of(texts: list[str]) -> set[int]:
    return set().union(*(ngrams(t) for t in texts)) if texts else set()


def overlap(eval_text: str | list[str], train_grams: set[int]) -> float:
    grams = ngrams(eval_text) if isinstance(eval_text, str) else grams_of(eval_text)
    return len(grams & train_grams) / max(1, len(grams))


def check_general_set(general_dir: Path, data_dir: Path) -> dict:
    """{subset: {training file: share of the subset's 13-grams found in it}} for every subset of
    the general evaluation set against every other JSONL file in `data_dir` (the recipes' data)."""
    train = {p.name: grams_of(strings_of(p)) for p in sorted(data_dir.glob("*.jsonl"))}
    return {sub.stem: {name: overlap(strings_of(sub), grams) for name, grams in train.items()}
            for sub in sorted(general_dir.glob("*.jsonl"))}
