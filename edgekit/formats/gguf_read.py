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
        header = f.read(24)
    if header[:4] != GGUF_MAGIC:
        raise EdgekitError(f"{path} is not a GGUF file (no GGUF magic bytes)", "pass a .gguf file written by llama.cpp or edgekit")
    check_counts(path, header)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated or corrupt: numpy/struct errors from deep inside the reader
        raise EdgekitError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {str(e)[:200]})",
                           "re-export or re-download it") from None
    short = _short_read(reader)
    if short:
        raise EdgekitError(f"{path} is a corrupt or truncated GGUF file ({short})", "re-export or re-download it")
    return reader


def _short_read(reader) -> str | None:
    """gguf's reader slices its memory map, so a length that runs past the file's end reads
    fewer bytes instead of failing: compare every declared length with what was read."""
    import numpy as np

    for name, f in reader.fields.items():
        p = f.parts
        for a, b in zip(p, p[1:]):  # a string is (uint64 length, uint8 bytes); an array (uint64 count, items)
            if a.dtype == np.uint64 and a.size == 1 and b.dtype == np.uint8 and int(a[0]) != b.size:
                return f"key '{name[:80]}' declares {int(a[0]):,} bytes and the file holds {b.size:,}"
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            return f"tensor '{t.name[:80]}' needs {int(t.n_bytes):,} bytes and the file holds {t.data.nbytes:,}"
    return None


def check_counts(path: Path, header: bytes) -> None:
    """Refuse a header whose tensor or key counts cannot fit in the file: each tensor entry
    takes at least 32 bytes and each key-value at least 13, so a count past size/13 is a lie
    (a header bomb), refused before any reader loops over it."""
    import struct

    version, n_tensors, n_kv = struct.unpack("<IQQ", header[4:24])
    size = path.stat().st_size
    if version not in (2, 3):
        raise EdgekitError(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3", "re-export it")
    if n_tensors * 32 > size or n_kv * 13 > size:
        raise EdgekitError(f"{path} claims {n_tensors:,} tensors and {n_kv:,} metadata keys, more than its "
                           f"{size:,} bytes can hold", "the file is corrupt: re-export or re-download it")


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


def non_finite_tensors(path: str | Path, limit: int = 5) -> list[str]:
    """Names of float tensors (F32/F16/BF16) holding NaN or Inf, at most `limit`; quantized
    tensors are not decoded."""
    import numpy as np

    bad = []
    for t in open_gguf(path).tensors:
        kind = t.tensor_type.name
        if kind in ("F32", "F16"):
            data = np.asarray(t.data)
        elif kind == "BF16":
            data = (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            continue
        if not np.isfinite(data).all():
            bad.append(t.name)
            if len(bad) >= limit:
                break
    return bad
