"""Documents in, train/holdout split out, by document and deterministic.

Supported inputs (paths relative to the recipe):
- JSONL with `text`, or `prompt` + `response`, or chat `messages` per line;
- plain text: documents separated by blank lines;
- `hf:NAME[:SPLIT]`: a Hugging Face dataset through the normal `datasets` code.

A training document may count more than once (`Document.weight`, a whole number of repeats in
the packed training rows): from a JSONL row's own `weight`, or from the recipe's `data.weights`
({FIELD: {VALUE: repeats}}: rows whose FIELD is VALUE), e.g. more of one genre in a mixed file.
The split into train and holdout ignores weights; the holdout is scored unweighted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgekit.bounded import jsonl_lines
from edgekit.errors import EdgekitError



@dataclass(frozen=True)
class Document:
    text: str = ""
    messages: tuple | None = None  # chat turns as (role, content) pairs
    weight: int = field(default=1, compare=False)  # times the document is packed into training rows

    def render(self, tokenizer=None) -> str:
        """The text a model reads: chat turns through the tokenizer's chat template."""
        if self.messages is None:
            return self.text
        turns = [{"role": r, "content": c} for r, c in self.messages]
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(turns, tokenize=False)
        return "\n".join(f"{r}: {c}" for r, c in self.messages)

    def prefix(self, tokenizer=None) -> str:
        """The part of `render` that is context, not trained on: every turn before the
        final assistant reply, with the template's generation prompt ('' for plain text)."""
        if self.messages is None or self.messages[-1][0] != "assistant":
            return ""
        turns = [{"role": r, "content": c} for r, c in self.messages[:-1]]
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return "\n".join(f"{r}: {c}" for r, c in self.messages[:-1]) + "\nassistant: "

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.text, self.messages]).encode()).hexdigest()


def load_documents(spec: str, base: Path, weights: dict[str, dict[str, int]] | None = None) -> list[Document]:
    """The documents of `spec`; `weights` ({FIELD: {VALUE: repeats}}) sets the weight of JSONL or
    dataset rows whose FIELD is VALUE (a row's own `weight` wins)."""
    seen: dict[str, set] = {f: set() for f in weights or {}}  # the values each weighting field takes
    if spec.startswith("hf:"):
        docs = _load_hf(spec[3:], weights, seen)
    else:
        path = base / spec
        if not path.is_file():
            raise EdgekitError(f"data file {path} does not exist", "check data.train in the recipe (paths are relative to it)")
        if weights and path.suffix not in (".jsonl", ".json"):
            raise EdgekitError(f"data.weights picks rows by a field, and {path} is plain text, which has none",
                               "give the data as JSONL with that field, or drop data.weights")
        docs = _load_jsonl(path, weights, seen) if path.suffix in (".jsonl", ".json") else _load_text(path)
    for f, table in (weights or {}).items():
        if missing := sorted(set(table) - seen[f]):
            raise EdgekitError(f"data.weights: no row of '{spec}' has {f} = {', '.join(map(repr, missing))} "
                               f"(its values: {sorted(seen[f])[:20] or 'none: no row has that field'})",
                               "fix the field name or value in data.weights")
    docs = _dedupe([d for d in docs if (d.text.strip() or d.messages)])
    if not docs:
        raise EdgekitError(f"dataset '{spec}' has no non-empty documents",
                           "give a file with at least a few documents (JSONL with 'text', or paragraphs of text)")
    return docs


def read_jsonl(path: Path):
    """(line number, parsed row) for every non-blank line; a clear error naming a bad line."""
    for n, line in jsonl_lines(path):
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgekitError(f"{path}:{n} is not valid JSON ({e.msg})", "each line must be one JSON object") from None
        except RecursionError:
            raise EdgekitError(f"{path}:{n} is nested too deeply", "each line must be one flat JSON object") from None


def _load_jsonl(path: Path, weights=None, seen=None) -> list[Document]:
    return [_weighted(_row_to_doc(row, f"{path}:{n}"), row, weights, seen, f"{path}:{n}") for n, row in read_jsonl(path)]


def _weighted(doc: Document, row: dict, weights, seen, where: str) -> Document:
    """`doc` with the weight its row asks for: its own `weight`, else the first `weights` match
    (`seen` collects the values the weighting fields take)."""
    for f in seen or {}:
        if isinstance(row.get(f), str):
            seen[f].add(row[f])
    w = row.get("weight")
    if w is None:
        w = next((table[row[f]] for f, table in (weights or {}).items()
                  if isinstance(row.get(f), str) and row[f] in table), 1)
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise EdgekitError(f"{where}: weight {w!r} is not a whole number >= 1",
                           "a document's weight is how many times it is packed into the training rows")
    return replace(doc, weight=w) if w != 1 else doc


def _row_to_doc(row, where: str) -> Document:
    if not isinstance(row, dict):
        raise EdgekitError(f"{where}: expected a JSON object, got {type(row).__name__}",
                           "use {\"text\": ...}, {\"prompt\": ..., \"response\": ...}, {\"prompt\": ...} or {\"messages\": [...]}")
    if isinstance(row.get("text"), str):
        return Document(text=row["text"])
    if "prompt" in row and "response" in row:
        return Document(messages=(("user", str(row["prompt"])), ("assistant", str(row["response"]))))
    if isinstance(row.get("prompt"), str) and "response" not in row:
        return Document(messages=(("user", row["prompt"]),))  # a prompt for generation
    if isinstance(row.get("messages"), list):
        try:
            return Document(messages=tuple((m["role"], m["content"]) for m in row["messages"]))
        except (KeyError, TypeError):
            raise EdgekitError(f"{where}: each message needs 'role' and 'content'", "fix the messages list") from None
    raise EdgekitError(f"{where}: no 'text', 'prompt'/'response' or 'messages' key (keys: {sorted(row)})",
                       "rename the field holding the text to 'text'")


def _load_text(path: Path) -> list[Document]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgekitError(f"{path} is not UTF-8 text", "give a .jsonl or UTF-8 .txt file") from None
    return [Document(text=p.strip()) for p in raw.split("\n\n") if p.strip()]


def _load_hf(name: str, weights=None, seen=None) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise EdgekitError("hf: datasets need the 'datasets' package", "pip install datasets") from None
    dataset, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, split=split or "train")
    except Exception as e:  # offline, unknown name, ...: the library's message says which
        raise EdgekitError(f"could not load dataset '{dataset}': {e}", "check the name, or download it and pass a local file") from None
    return [_weighted(_row_to_doc(dict(r), f"{dataset}[{i}]"), dict(r), weights, seen, f"{dataset}[{i}]") for i, r in enumerate(ds)]


def _dedupe(docs: list[Document]) -> list[Document]:
    seen, out = set(), []
    for d in docs:
        if d.key not in seen:
            seen.add(d.key)
            out.append(d)
    return out


def split_documents(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Holdout by document: a document's hash decides, so adding documents never moves old ones."""
    if len(docs) < 2:
        raise EdgekitError(f"the dataset has {len(docs)} document(s); a train/holdout split needs at least 2",
                           "add documents, or give data.holdout as a separate file")

    def score(d: Document) -> float:
        return int(hashlib.sha256(f"{seed}:{d.key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    ranked = sorted(docs, key=score)
    n_hold = max(1, round(len(docs) * fraction))
    holdout = set(id(d) for d in ranked[:n_hold])
    return [d for d in docs if id(d) not in holdout], [d for d in docs if id(d) in holdout]


def ngram_overlap(train: list[str], holdout: list[str], n: int = 13) -> float:
    """Share of holdout word n-grams (whitespace words, counted with repeats) that also occur in
    training text (0 = clean). Its value is part of every run's stage keys: kept as it was, so
    finished runs stay cached (edgekit.data.contamination measures the general set)."""
    def grams(text: str) -> set[tuple[str, ...]]:
        w = text.lower().split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    train_grams = set().union(*(grams(t) for t in train)) if train else set()
    hold = [g for t in holdout for g in grams(t)]
    return sum(g in train_grams for g in hold) / len(hold) if hold else 0.0
