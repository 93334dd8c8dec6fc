"""Where each transformers weight went in a converted GGUF, found from the data itself.

llama.cpp's converter renames every tensor and, per architecture, reorders rows (llama's Q
and K projections go from rotate-half to interleaved rotary pairs), splits or keeps fused
projections, and shifts norms. Rather than re-derive those rules for each architecture,
match rows: a 2-D weight's rows, rounded to fp16 as the F16 file stores them, appear whole in
exactly one GGUF tensor, possibly permuted. Each GGUF tensor is then (HF weight, row indices),
which is all a repacking needs, because every GGML block lies within one row: quantizing the
permuted rows gives the permuted blocks, and a trained grid's packed rows move whole.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class Placement:
    hf: str  # the transformers weight name ("model.layers.0.self_attn.q_proj.weight")
    rows: np.ndarray  # GGUF row i holds HF row rows[i]


def _row_keys(a: np.ndarray) -> list[bytes]:
    a = np.ascontiguousarray(a.astype(np.float16))
    return [hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in a]


def hf_rows(model_dir: Path) -> dict[bytes, list[tuple[str, int]]]:
    """fp16 row content -> [(HF weight, row)] for every 2-D weight of the model directory."""
    from safetensors import safe_open

    index: dict[bytes, list[tuple[str, int]]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                if t.ndim != 2:
                    continue
                for i, k in enumerate(_row_keys(t.float().numpy())):
                    index.setdefault(k, []).append((key, i))
    return index


def layout(model_dir: Path, gguf_path: Path) -> dict[str, Placement]:
    """{GGUF tensor name: Placement} for the 2-D F16/F32 tensors of a converted GGUF."""
    import gguf

    index = hf_rows(model_dir)
    out = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        if len(t.shape) != 2 or t.tensor_type.name not in ("F16", "F32"):
            continue
        rows = np.asarray(t.data).reshape(int(t.shape[1]), int(t.shape[0]))
        keys = _row_keys(rows)
        votes = Counter(hf for k in keys for hf, _ in index.get(k, ()))
        if not votes:
            continue  # made by the converter (no HF counterpart): quantized from its own data
        hf = votes.most_common(1)[0][0]
        where = {}
        for k in keys:
            for name, i in index.get(k, ()):
                if name == hf:
                    where.setdefault(k, i)
        if len(where) < len(set(keys)):
            continue  # rows not all from one weight (a transformed tensor): quantized from its own data
        out[t.name] = Placement(hf, np.array([where[k] for k in keys]))
    return out


def by_hf_name(placements: dict[str, Placement]) -> dict[str, str]:
    """{HF weight: GGUF tensor} (a weight split over several GGUF tensors maps to the first)."""
    names = {}
    for gname, p in placements.items():
        names.setdefault(p.hf, gname)
    return names


def require_placed(placements: dict[str, Placement], keys, what: str) -> None:
    placed = {p.hf for p in placements.values()}
    missing = [k for k in keys if k not in placed]
    if missing:
        raise EdgekitError(f"{what}: {missing[:3]} could not be found in llama.cpp's converted file",
                           "this architecture transforms those weights on conversion; export it without a trained grid")
