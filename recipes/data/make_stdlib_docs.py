"""Build recipes/data/stdlib_docs.jsonl: real English prose from Python's standard library.

    python recipes/data/make_stdlib_docs.py

Each document is one standard-library module's documentation: its module docstring and
the docstrings of its public classes and functions, as written by CPython's authors. The
file is committed so every machine trains on the same bytes; rerun this script only to
regenerate it (output depends on the Python version, recorded in each line).
"""

import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path

MIN_CHARS = 1500  # drop stubs: a document should hold a few paragraphs
MAX_CHARS = 12000
SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "pydoc_data")


def module_text(name: str) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except Exception:
        return None
    parts = [inspect.getdoc(mod) or ""]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(f"{attr}: {doc}")
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    return text[:MAX_CHARS] if len(text) >= MIN_CHARS else None


def main() -> None:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith(("_",) + SKIP))
    out = Path(__file__).with_name("stdlib_docs.jsonl")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    n = 0
    with out.open("w") as f:
        for name in names:
            text = module_text(name)
            if text:
                f.write(json.dumps({"id": name, "source": f"python{version}-stdlib", "text": text}) + "\n")
                n += 1
    print(f"wrote {n} documents to {out}")


if __name__ == "__main__":
    main()
