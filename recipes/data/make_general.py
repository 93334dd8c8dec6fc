"""Build the general evaluation set (recipes/data/general/*.jsonl) and the general training /
calibration corpus (recipes/data/general_train.jsonl) from packages installable here.

    apt-get install bible-kjv                       # Debian: the King James Version and its reader
    python3 -m venv /tmp/gv && /tmp/gv/bin/pip install gensim chatterbot-corpus==1.3.3 --no-deps \
        && /tmp/gv/bin/pip install numpy scipy smart_open
    /tmp/gv/bin/python recipes/data/make_general.py [--large]

Four genres, each split by whole documents into an evaluation part and a training part that
share no document (recipes/data/general/README.md gives every source and licence):
  narrative   King James Version, narrative books (Debian bible-kjv-text; public domain)
  expository  English Wikipedia articles in gensim's test data (PyPI gensim 4.4.0; CC BY-SA)
  dialogue    chatterbot-corpus English conversations (PyPI chatterbot-corpus 1.3.3; BSD-3-Clause)
  code        llama.cpp C/C++ sources from llama-cpp-python 0.3.36's sdist (MIT)
The files are committed so every machine evaluates the same bytes; this script regenerates them
and then runs the contamination check (`edgekit.data.contamination`) against every training set
of the project's recipes. `--large` also writes general_train_large.jsonl: the same narrative and
code, and for expository and dialogue (the genres QAT-KD gains least on) every document the
evaluation set does not hold, up to TRAIN_CHARS_LARGE per genre and LARGE_DOC_CHARS per document.
"""

import bz2
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
EVAL_CHARS = 64_000  # per subset: ~14-20k tokens
TRAIN_CHARS = 96_000
DOC_CHARS = 6_000
TRAIN_CHARS_LARGE, LARGE_DOC_CHARS = 400_000, 24_000
LARGE_GENRES = ("expository", "dialogue")

# narrative: (book, chapters) as the `bible` reader names them; first group evaluation, second training
NARRATIVE = ([("Ruth", "1:1-4:22"), ("Esther", "1:1-10:3"), ("Jonah", "1:1-4:11"), ("Mark", "1:1-8:38"),
              ("Daniel", "1:1-6:28")],
             [("Genesis", "37:1-50:26"), ("1 Samuel", "16:1-20:42"), ("Acts", "27:1-28:31"), ("Judges", "13:1-16:31"),
              ("2 Samuel", "11:1-12:31"), ("Luke", "15:1-16:31")])


def narrative() -> tuple[list[dict], list[dict]]:
    def book(name: str, span: str) -> str:
        out = subprocess.run(["bible", "-f", f"{name} {span}"], capture_output=True, text=True, check=True).stdout
        verses = [re.sub(r"^\S+\d+:\d+\s+", "", line).strip() for line in out.splitlines() if line.strip()]
        return " ".join(verses)

    return tuple([{"id": f"kjv-{b.lower().replace(' ', '')}", "source": "bible-kjv-text (Debian)", "text": book(b, s)}
                  for b, s in group] for group in NARRATIVE)


def expository(doc_chars: int = DOC_CHARS) -> tuple[list[dict], list[dict]]:
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = Path(gensim.__file__).parent / "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    docs = []
    for title, text, _ in extract_pages(bz2.open(dump)):
        if text.lower().startswith("#redirect"):
            continue
        body = filter_wiki(text)
        body = re.split(r"\n==\s*(See also|References|Notes|External links|Further reading)\s*==", body)[0]
        body = re.sub(r"'{2,}", "", body)
        body = re.sub(r"^=+\s*(.*?)\s*=+$", r"\1", body, flags=re.M)
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        if len(body) > 2000:
            docs.append({"id": f"wiki-{title.lower().replace(' ', '_')}", "source": "gensim test data (English Wikipedia)",
                         "text": body[:doc_chars]})
    return docs[0::2], docs[1::2]


def dialogue(doc_chars: int = DOC_CHARS) -> tuple[list[dict], list[dict]]:
    import chatterbot_corpus
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    docs = []
    for f in sorted(folder.glob("*.yml")):
        convs = yaml.safe_load(f.read_text()).get("conversations") or []
        turns = []
        for conv in convs:
            speakers = ["User", "Bot"]
            turns.append("\n".join(f"{speakers[i % 2]}: {str(t).strip()}" for i, t in enumerate(conv)))
        docs.append({"id": f"chat-{f.stem}", "source": "chatterbot-corpus 1.3.3 (PyPI)", "text": "\n\n".join(turns)[:doc_chars]})
    return docs[0::2], docs[1::2]


def code() -> tuple[list[dict], list[dict]]:
    import os

    # the llama.cpp source every GGUF export's converter comes from (third_party/llama_cpp_source.sh)
    src = Path(os.environ.get("EDGEKIT_LLAMA_SRC") or max((Path.home() / ".cache/edgekit").glob("llama.cpp-src-*")))
    files = sorted([*src.glob("src/llama-*.cpp"), *src.glob("common/*.cpp")])
    docs = [{"id": f"llama.cpp-{f.name}", "source": "llama-cpp-python 0.3.36 sdist (llama.cpp)",
             "text": f.read_text(errors="replace")[:DOC_CHARS]} for f in files if f.stat().st_size > 3000]
    return docs[0::2], docs[1::2]


def take(docs: list[dict], budget: int) -> list[dict]:
    out, used = [], 0
    for d in docs:
        if used >= budget:
            break
        out.append(d)
        used += len(d["text"])
    return out


def decontaminate(doc: dict, eval_grams: set[int]) -> dict:
    """The training document without the lines that share a 13-gram with the evaluation set
    (licence headers, #include blocks, repeated chat lines), repeated until none is shared."""
    from edgekit.data.contamination import N, _WORD

    lines = doc["text"].splitlines()
    for _ in range(5):
        owner = [i for i, line in enumerate(lines) for _ in _WORD.findall(line.lower())]
        words = _WORD.findall("\n".join(lines).lower())
        drop = {owner[j] for i in range(len(words) - N + 1) if hash(tuple(words[i:i + N])) in eval_grams
                for j in range(i, i + N)}
        if not drop:
            break
        lines = [line for i, line in enumerate(lines) if i not in drop]
    return {**doc, "text": "\n".join(lines)}


def main() -> None:
    from edgekit.data.contamination import check_general_set, ngrams

    general = HERE / "general"
    general.mkdir(exist_ok=True)
    train, held = [], {}  # held: each genre's evaluation documents and their 13-grams
    builders = {"narrative": narrative, "expository": expository, "dialogue": dialogue, "code": code}
    for name, build in builders.items():
        ev, tr = build()
        ev, tr = take(ev, EVAL_CHARS), take(tr, TRAIN_CHARS)
        grams = set().union(*(ngrams(d["text"]) for d in ev))
        held[name] = ({d["id"] for d in ev}, grams)
        tr = [decontaminate(d, grams) for d in tr]
        (general / f"{name}.jsonl").write_text("".join(json.dumps({**d, "genre": name}) + "\n" for d in ev))
        train += [{**d, "genre": name} for d in tr]
        print(f"{name}: eval {len(ev)} docs / {sum(len(d['text']) for d in ev)} chars; train {len(tr)} docs")
    (HERE / "general_train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in train))
    if "--large" in sys.argv[1:]:
        large = [d for d in train if d["genre"] not in LARGE_GENRES]
        for name in LARGE_GENRES:
            ids, grams = held[name]
            ev_long, tr_long = builders[name](LARGE_DOC_CHARS)
            rest = [d for d in ev_long + tr_long if d["id"] not in ids]  # every other document, whole or longer
            tr = [decontaminate(d, grams) for d in take(rest, TRAIN_CHARS_LARGE)]
            large += [{**d, "genre": name} for d in tr]
            print(f"{name} (large): train {len(tr)} docs / {sum(len(d['text']) for d in tr)} chars")
        (HERE / "general_train_large.jsonl").write_text("".join(json.dumps(d) + "\n" for d in large))
    print(json.dumps(check_general_set(general, HERE), indent=2))


if __name__ == "__main__":
    main()
