"""Write a transformers model directory as a GGUF file: llama.cpp's converter for the float
file, llama.cpp's quantizer for a mix, edgekit's exact quantizers for a trained grid.

    float (f16/f32)   convert_hf_to_gguf.py (converter.py), then edgekit's metadata fixes
    a mix (q4_k_m...) the float file through llama_model_quantize: llama.cpp's own file
    with `types`      ... whose tensors holding a trained weight (a QAT plan) are replaced by
                      edgekit's exact quantization of the same rows, same GGML type (bit for
                      bit what llama.cpp writes from those weights), or with `blocks` (learned
                      scales, GPTQ codes) by those blocks packed as they are

Tensors are matched to transformers weights by their rows (tensor_map.py), so no
per-architecture naming or rotary-permutation code lives here. Metadata fixes, each a
listed difference from the converter's file:
- a model converted from a GGUF (the embedded ones) keeps that GGUF's tokenizer metadata
  verbatim (`gguf_tokenizer.json`), so tokenization, special ids and chat template are the
  original file's;
- Gemma 3: the per-layer sliding-window pattern and local rope base are written from
  config.json's `layer_types` / `rope_parameters` (the converter leaves llama.cpp's 5:1 default,
  wrong for students that keep other layers);
- `general.name` is the name edgekit gives the file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.export.converter import convert
from edgekit.formats import EXACT_TYPES, MIXES
from edgekit.fsutil import atomic_path
from edgekit.models.sources import GGUF_TOKENIZER_FILE


def write_gguf(model_dir: Path, out: Path, ftype: str = "f16", name: str | None = None,
               types: dict[str, str] | None = None, blocks: dict[str, object] | None = None) -> Path:
    """Write `model_dir` as GGUF `ftype`. A quantized mix needs `types` ({HF weight name: GGML
    type}, a QAT plan from `quant.qat.plan_types`): those weights are quantized by edgekit's
    exact quantizers (or, in `blocks`, packed as given), the rest as llama.cpp quantizes them."""
    from edgekit.export.llama_quantize import quantize_gguf
    from edgekit.export.tensor_map import layout
    from edgekit.formats.gguf_read import open_gguf

    model_dir, out = Path(model_dir), Path(out)
    if not MIXES[ftype].is_float and types is None:
        raise EdgekitError(f"write_gguf writes a quantized mix ('{ftype}') only with a per-tensor type plan",
                           "quantize the F16 file with llama.cpp (export formats f16 + q4_k_m)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as tmp:
        float_file = float_gguf(model_dir, Path(tmp) / "float.gguf", "f32" if ftype == "f32" else "f16", name)
        if MIXES[ftype].is_float:
            with atomic_path(out) as dst:
                Path(float_file).replace(dst)
            return out
        theirs = quantize_gguf(float_file, Path(tmp) / "llama.gguf", ftype)
        planned = {g: p for g, p in layout(model_dir, float_file).items() if p.hf in types or p.hf in (blocks or {})}
        floats = {t.name: t for t in open_gguf(float_file).tensors}
        rewrite(theirs, out, tensors=lambda t: _trained_grid(t, floats.get(t.name), planned.get(t.name), types, blocks or {}))
    return out


def float_gguf(model_dir: Path, out: Path, outtype: str, name: str | None) -> Path:
    """The converter's float file with edgekit's metadata fixes (see the module docstring)."""
    refuse_inexpressible(json.loads((model_dir / "config.json").read_text()))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        raw = convert(model_dir, Path(tmp) / "convert.gguf", outtype,
                      tokenizer_replaced=(model_dir / GGUF_TOKENIZER_FILE).is_file())
        return rewrite(raw, out, fields=_metadata_fixes(model_dir, raw, name))


def refuse_inexpressible(cfg: dict) -> None:
    """Models the converter would write into a file that computes something else. Gemma 3:
    llama.cpp has no key for query_pre_attn_scalar; it scales queries by 1/sqrt(head_dim), or by
    1/sqrt(hidden/heads) for the 62-layer 27B. SmolLM3: llama.cpp skips rope on every 4th layer,
    whatever `no_rope_layers` says (a student keeping other layers moves them)."""
    if cfg.get("model_type") == "smollm3" and cfg.get("no_rope_layers") is not None:
        fixed = [int((i + 1) % 4 != 0) for i in range(cfg["num_hidden_layers"])]
        if list(cfg["no_rope_layers"]) != fixed:
            raise EdgekitError(f"SmolLM3 no_rope_layers is {cfg['no_rope_layers']} but llama.cpp applies rope to every "
                               f"layer except every 4th ({fixed}): the GGUF would compute something else",
                               "keep the teacher's NoPE pattern (keep every layer of each group of 4), or export ONNX only")
        return
    if cfg.get("model_type") not in ("gemma3", "gemma3_text"):
        return
    cfg = cfg.get("text_config", cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    scalar = cfg.get("query_pre_attn_scalar", head_dim)
    if scalar == head_dim or (cfg["num_hidden_layers"] == 62 and scalar == cfg["hidden_size"] // cfg["num_attention_heads"]):
        return
    raise EdgekitError(f"Gemma 3 query_pre_attn_scalar is {scalar} but head_dim is {head_dim}: llama.cpp would scale "
                       "attention differently from this model", "use a model whose query_pre_attn_scalar equals head_dim")


def _metadata_fixes(model_dir: Path, raw: Path, name: str | None) -> dict:
    """{key: (value, GGUFValueType, sub_type) or None to drop} to apply over the converter's metadata."""
    import gguf

    from edgekit.formats.gguf_read import read_metadata

    meta = read_metadata(raw)
    arch = meta["general.architecture"]
    fixes = {"general.name": (name or model_dir.name, gguf.GGUFValueType.STRING, None)}
    original = model_dir / GGUF_TOKENIZER_FILE
    if original.is_file():
        fixes |= {k: None for k in meta if k.startswith("tokenizer.")}
        for key, (vtype, sub, value) in json.loads(original.read_text()).items():
            fixes[key] = (value, gguf.GGUFValueType[vtype], gguf.GGUFValueType[sub] if sub else None)
    cfg = json.loads((model_dir / "config.json").read_text())
    if arch == "gemma3" and cfg.get("sliding_window") and cfg.get("layer_types"):
        pattern = [t == "sliding_attention" for t in cfg["layer_types"]]
        fixes[f"{arch}.attention.sliding_window_pattern"] = (pattern, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
        local = ((cfg.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")
        if local:
            fixes[f"{arch}.rope.freq_base_swa"] = (float(local), gguf.GGUFValueType.FLOAT32, None)
    return fixes


def rewrite(src: Path, out: Path, fields: dict | None = None, tensors=None) -> Path:
    """Copy the GGUF `src` to `out`, with `fields` set over its metadata (None drops a key) and
    each tensor passed through `tensors(t) -> (data, GGMLQuantizationType) or None` (None: as is)."""
    import gguf

    from edgekit.formats.gguf_read import open_gguf

    reader = open_gguf(src)
    fields = dict(fields or {})
    arch = reader.fields["general.architecture"].contents()
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if key in fields:
                continue
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
        for key, spec in fields.items():
            if spec is not None:
                w.add_key_value(key, spec[0], spec[1], sub_type=spec[2])
        for t in reader.tensors:
            replaced = tensors(t) if tensors else None
            data, qtype = replaced if replaced is not None else (np.asarray(t.data), t.tensor_type)
            w.add_tensor(t.name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
    return out


def _trained_grid(t, float_t, p, types: dict, blocks: dict):
    """A planned tensor's bytes from edgekit's exact quantizers applied to its fp16 rows in the
    float file (or its packed blocks, rows in the file's order), in the type llama.cpp chose for
    it; None keeps llama.cpp's own bytes (tensors no trained weight maps to, and floats)."""
    import torch

    from edgekit.formats.ggml_blocks import pack_exact, to_bytes

    if p is None or t.tensor_type.name in ("F16", "F32"):
        return None
    kind = t.tensor_type.name
    if p.hf in blocks:
        blk = blocks[p.hf]
        if blk.fmt != EXACT_TYPES.get(kind):
            raise EdgekitError(f"{p.hf}: its trained blocks are {blk.fmt} but llama.cpp stores {t.name} as {kind}",
                               "the QAT plan is stale: rerun the qat stage")
        return pack_exact(blk).numpy()[p.rows], t.tensor_type
    planned = types.get(p.hf)
    if planned not in EXACT_TYPES:  # no exact quantizer for it ("mixed", Q5_K...): QAT left it in float
        return None
    if planned != kind:
        raise EdgekitError(f"{p.hf} is planned as {planned} but llama.cpp stores {t.name} as {kind}",
                           "the QAT plan is stale: rerun the qat stage")
    rows = torch.from_numpy(np.asarray(float_t.data).astype(np.float32))  # (R, C): fp16 values, as llama.cpp reads them
    return to_bytes(rows, EXACT_TYPES[kind]).numpy(), t.tensor_type


def gguf_names(model_dir: Path) -> dict[str, str]:
    """{HF weight name: GGUF tensor name} of this model as llama.cpp's converter writes it."""
    from edgekit.export.tensor_map import by_hf_name, layout

    with tempfile.TemporaryDirectory(prefix="edgekit-names-") as tmp:
        return by_hf_name(layout(model_dir, convert(Path(model_dir), Path(tmp) / "f16.gguf", "f16")))
