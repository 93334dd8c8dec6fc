"""Write a transformers model directory as a GGUF file llama.cpp loads (gguf package).

Supported: the llama family (Llama, SmolLM2, and students derived from them), Qwen2 and
Gemma 3 (text). Tensor names come from gguf's own `TensorNameMap`. For llama, Q and K
projections are permuted from the HF rotate-half layout back to llama.cpp's interleaved
rotary layout, as llama.cpp's converter does (Qwen2 and Gemma 3 use rotate-half in
llama.cpp too); Gemma 3's norms are stored with the +1 its RMSNorm adds. Tokenizer metadata is copied verbatim from the GGUF the model came from
(`gguf_tokenizer.json`), else built from the HF tokenizer files with gguf's vocab helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.formats import EXACT_TYPES, MIXES
from edgekit.fsutil import atomic_path
from edgekit.models.sources import GGUF_TOKENIZER_FILE

SUPPORTED = {"llama": "LLAMA", "qwen2": "QWEN2", "gemma3_text": "GEMMA3"}  # transformers model_type -> gguf arch
PERMUTE_QK = {"llama"}
NORM_SHIFT = {"gemma3_text": 1.0}  # Gemma3RMSNorm computes x * (1 + w); llama.cpp multiplies by the stored w


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head*head_dim, in) rotate-half rows -> interleaved pairs, per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name_map, key: str, arch: str) -> str:
    """The GGUF tensor name of a transformers weight name (gguf's own TensorNameMap)."""
    gname = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise EdgekitError(f"tensor '{key}' has no GGUF name for {arch}", "is this a plain llama-family model?")
    return gname


def tensor_name_map(cfg: dict):
    import gguf

    arch = cfg.get("model_type")
    if arch not in SUPPORTED:
        raise EdgekitError(f"the GGUF writer does not support model_type '{arch}' yet (supported: {sorted(SUPPORTED)})",
                           "export a llama-family model, or convert with llama.cpp's convert_hf_to_gguf.py")
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, SUPPORTED[arch]), cfg["num_hidden_layers"])


def write_gguf(model_dir: Path, out: Path, ftype: str = "f16", name: str | None = None,
               types: dict[str, str] | None = None, blocks: dict[str, object] | None = None) -> Path:
    """Write `model_dir` as GGUF. F32/F16 by default; with `types` ({weight name: GGML type},
    e.g. a QAT plan) each weight is quantized by edgekit's exact block quantizers into the
    bytes llama.cpp's own quantizer would write, so a QAT grid reaches the file unchanged.
    `blocks` ({weight name: quantized blocks}, e.g. from GPTQ on the GGUF grid) are packed
    as they are, in place of the named weights."""
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = cfg.get("model_type")
    tensor_name_map(cfg)  # refuses an architecture the writer does not know, before anything is written
    blocks = blocks or {}
    if not MIXES[ftype].is_float and types is None:
        raise EdgekitError(f"write_gguf writes f32/f16 by itself; '{ftype}' needs a per-tensor type plan",
                           "quantize the F16 file with llama.cpp (export formats f16 + q4_k_m)")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    float_type = gguf.GGMLQuantizationType.F32 if ftype == "f32" else gguf.GGMLQuantizationType.F16

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, SUPPORTED[arch])])
        w.add_name(name or model_dir.name)
        w.add_type("model")
        w.add_file_type(gguf.LlamaFileType[MIXES[ftype].file_type])
        if types is not None:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(w, cfg, arch, head_dim)
        _add_tokenizer(w, model_dir, gguf)
        _add_tensors(w, model_dir, cfg, float_type, types, blocks, gguf)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
    return out


def _add_hparams(w, cfg: dict, arch: str, head_dim: int) -> None:
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(float(_rope_theta(cfg)))
    if arch != "gemma3_text":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(cfg["vocab_size"])
        return
    _check_gemma3_attention_scale(cfg, head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
        # which layers slide, and their rope base, from the config: llama.cpp otherwise assumes
        # Gemma 3's usual 5-sliding-1-full pattern and base 10000, wrong for students that keep other layers
        if cfg.get("layer_types"):
            w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        local = ((cfg.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")
        if local:
            w.add_rope_freq_base_swa(float(local))
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])


def _add_tensors(w, model_dir: Path, cfg: dict, float_type, types: dict | None, blocks: dict, gguf) -> None:
    """Every weight of the safetensors files, renamed to GGUF's names, in its planned type."""
    from safetensors import safe_open

    arch = cfg["model_type"]
    name_map = tensor_name_map(cfg)
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    seen = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="numpy") as st:
            for key in st.keys():
                if key == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                    continue
                gname = gguf_name(name_map, key, arch)
                if gname in seen:
                    raise EdgekitError(f"duplicated tensor '{gname}'", "the model directory has two weight files for one tensor")
                seen.add(gname)
                packed = key in blocks
                data = _packed(blocks[key]) if packed else _tensor_as_f32(st, key)
                if arch in PERMUTE_QK and key.endswith("q_proj.weight"):
                    data = _permute_rotary(data, n_head)  # a row permutation: packed rows move whole
                elif arch in PERMUTE_QK and key.endswith("k_proj.weight"):
                    data = _permute_rotary(data, n_kv)
                elif arch in NORM_SHIFT and key.endswith("norm.weight"):
                    data = data + np.float32(NORM_SHIFT[arch])
                if packed:
                    qtype = gguf.GGMLQuantizationType[_ggml_name(blocks[key].fmt)]
                elif data.ndim == 1:  # norms stay F32, as llama.cpp's converter does
                    qtype = gguf.GGMLQuantizationType.F32
                elif types is not None:
                    data, qtype = _planned(data, key, types, gguf)
                else:
                    qtype = float_type
                    if qtype == gguf.GGMLQuantizationType.F16:
                        data = data.astype(np.float16)
                w.add_tensor(gname, data, raw_dtype=qtype)


def _planned(data: np.ndarray, key: str, types: dict[str, str], gguf) -> tuple[np.ndarray, object]:
    """One weight in its planned GGML type: block bytes from the exact quantizers. The weight
    is rounded to fp16 first, as llama.cpp quantizes from the F16 file (and QAT trains)."""
    import torch

    from edgekit.formats.ggml_blocks import GGML_TYPES, to_bytes

    t = types.get(key)
    if t in ("F32", "F16"):
        return data.astype(np.float32 if t == "F32" else np.float16), gguf.GGMLQuantizationType[t]
    if t not in GGML_TYPES:
        raise EdgekitError(f"no exact quantizer for '{key}' planned as {t}",
                           f"plans may use {sorted(GGML_TYPES)} + F16/F32; let llama.cpp quantize this file instead")
    w16 = torch.from_numpy(data.astype(np.float16).astype(np.float32))
    return to_bytes(w16, GGML_TYPES[t]).numpy(), gguf.GGMLQuantizationType[t]


def _packed(blk) -> np.ndarray:
    """(rows, bytes per row) uint8: the GGUF bytes of already quantized blocks."""
    from edgekit.formats.ggml_blocks import pack_exact

    return pack_exact(blk).numpy()


def _ggml_name(fmt: str) -> str:
    return {v: k for k, v in EXACT_TYPES.items()}[fmt]


def _tensor_as_f32(st, key: str) -> np.ndarray:
    try:
        return st.get_tensor(key).astype(np.float32)
    except TypeError:  # bf16 has no numpy dtype: go through torch
        from safetensors import safe_open  # noqa: F401

        raise EdgekitError(f"tensor '{key}' is bfloat16", "save the model in float32 or float16 before export") from None


def _check_gemma3_attention_scale(cfg: dict, head_dim: int) -> None:
    """llama.cpp has no key for Gemma 3's query_pre_attn_scalar: it scales queries by
    1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 62-layer 27B. Refuse anything else
    rather than write a file that computes something different."""
    scalar = cfg.get("query_pre_attn_scalar", head_dim)
    if scalar == head_dim or (cfg["num_hidden_layers"] == 62 and scalar == cfg["hidden_size"] // cfg["num_attention_heads"]):
        return
    raise EdgekitError(f"Gemma 3 query_pre_attn_scalar is {scalar} but head_dim is {head_dim}: llama.cpp would scale "
                       "attention differently from this model", "use a model whose query_pre_attn_scalar equals head_dim")


def _rope_theta(cfg: dict) -> float:
    """The rope base; for models with sliding-window layers, that of the full-attention layers."""
    if "rope_theta" in cfg:
        return cfg["rope_theta"]
    params = cfg.get("rope_parameters") or {}
    return params.get("full_attention", params).get("rope_theta", 10000.0)


def _add_tokenizer(w, model_dir: Path, gguf) -> None:
    src = model_dir / GGUF_TOKENIZER_FILE
    if src.is_file():
        for key, (vtype, sub, value) in json.loads(src.read_text()).items():
            w.add_key_value(key, value, gguf.GGUFValueType[vtype], sub_type=gguf.GGUFValueType[sub] if sub else None)
        return
    vocab = gguf.vocab.BpeVocab(model_dir)  # tokenizer.json / vocab.json + merges
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(ttype)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(w)
