"""Read GGUF files (metadata, tensor table) with the `gguf` package, with clear errors."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"{path} does not exist or is not a file", "pass a .gguf file")
    if path.stat().st_size < 24:
        raise EdgekitError(f"{path} is {path.stat().st_size} bytes, too small to be a GGUF file", "re-export or re-download it")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise EdgekitError(f"{path} is not a GGUF file (no GGUF magic bytes)", "pass a .gguf file written by llama.cpp or edgekit")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated or corrupt: numpy/struct errors from deep inside the reader
        raise EdgekitError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})",
                           "re-export or re-download it") from None


def read_metadata(path: str | Path, typed: bool = False) -> dict:
    """Metadata as {key: value}; with `typed`, {key: [type, sub_type, value]} for rewriting."""
    reader = open_gguf(path)
    out = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = fld.contents()
        if typed:
            sub = fld.types[1].name if len(fld.types) > 1 else None
            out[key] = [fld.types[0].name, sub, value]
        else:
            out[key] = value
    return out


def tensor_table(path: str | Path) -> list[dict]:
    reader = open_gguf(path)
    return [{"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
             "bytes": int(t.n_bytes)} for t in reader.tensors]
