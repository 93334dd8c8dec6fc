"""Inputs read within bounds: YAML without aliases, capped sizes, depths and string lengths;
JSON and JSONL files with capped sizes and lines. Anything past a bound is an
`EdgekitError` (exit 2, one line) before it can cost time or memory, and no message ever
prints an unbounded value (`cut`).

Why aliases are refused outright: `yaml.safe_load` builds `&a [*b, *b, ...]` chains as shared
references, so ten levels of nine aliases load instantly as a value with 9**10 leaves, and
whatever walks it (validation, printing, copying) never finishes. Recipes have no use for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from edgekit.errors import EdgekitError

MAX_YAML_BYTES = 1 << 20  # a recipe is a few KB
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_NODES = 100_000
MAX_STRING = 1 << 16  # one scalar (a prompt, a path)
MAX_JSON_BYTES = 256 << 20  # tokenizer.json of a 262k vocabulary is ~33 MB
MAX_JSONL_LINE = 16 << 20  # one training document or task


def cut(value, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters and saying how much was cut."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


class _BoundedLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing aliases and counting depth, nodes and scalar lengths."""

    def __init__(self, stream, where: str):
        super().__init__(stream)
        self.where, self.depth, self.nodes = where, 0, 0

    def _refuse(self, what: str, fix: str):
        mark = self.peek_event().start_mark
        raise EdgekitError(f"{self.where}: {what} (line {mark.line + 1}, column {mark.column + 1})", fix)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._refuse(f"YAML alias '*{self.peek_event().anchor}' is not accepted",
                         "write the value out instead of referring to an anchor")
        self.depth += 1
        self.nodes += 1
        if self.depth > MAX_DEPTH:
            self._refuse(f"nested more than {MAX_DEPTH} levels deep", "flatten the structure")
        if self.nodes > MAX_NODES:
            self._refuse(f"more than {MAX_NODES:,} values", "a recipe this large is not a recipe; check the file")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            k = key_node.value
            if k in seen:
                mark = key_node.start_mark
                raise EdgekitError(f"{self.where}: key '{cut(k, 64)}' appears twice in one mapping (line {mark.line + 1}); "
                                   "YAML would keep the last one silently", "keep one of them")
            seen.add(k)
        return super().construct_mapping(node, deep)

    def compose_scalar_node(self, anchor):
        if len(self.peek_event().value) > MAX_STRING:
            self._refuse(f"a value of {len(self.peek_event().value):,} characters (at most {MAX_STRING:,})",
                         "put long text in a data file the recipe names")
        return super().compose_scalar_node(anchor)


def load_yaml(text: str, where: str):
    """yaml.safe_load within the bounds above; `where` names the source in errors."""
    if len(text) > MAX_YAML_BYTES:
        raise EdgekitError(f"{where} is {len(text):,} characters; a recipe is at most {MAX_YAML_BYTES:,}",
                           "check that this is the recipe you meant")
    loader = _BoundedLoader(text, where)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_text(path: Path, limit: int, what: str) -> str:
    """A UTF-8 text file of at most `limit` bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise EdgekitError(f"{what} {path} is {size:,} bytes (at most {limit:,})", "check that this is the file you meant")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgekitError(f"{what} {path} is not UTF-8 text (byte {e.start})", "save it as UTF-8") from None
    except OSError as e:
        raise EdgekitError(f"cannot read {what} {path}: {e.strerror}", "check the path and its permissions") from None


def read_json(path: Path, what: str = "JSON file", limit: int = MAX_JSON_BYTES):
    """A JSON file within `limit` bytes, with errors that name it instead of a traceback."""
    text = read_text(path, limit, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EdgekitError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno})", "fix or regenerate it") from None
    except RecursionError:
        raise EdgekitError(f"{what} {path} is nested too deeply to be a real file", "fix or regenerate it") from None


def jsonl_lines(path: Path, limit: int = MAX_JSONL_LINE):
    """(line number, text) of each non-blank line, each at most `limit` bytes of UTF-8."""
    with Path(path).open("rb") as f:
        n = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            n += 1
            if len(raw) > limit:
                raise EdgekitError(f"{path}:{n} is longer than {limit >> 20} MB", "split the document into several lines")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EdgekitError(f"{path}:{n} is not UTF-8 (byte {e.start} of the line)", "save the file as UTF-8") from None
            if line.strip():
                yield n, line
