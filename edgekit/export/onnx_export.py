"""int4 ONNX for ONNX Runtime, through onnxruntime-genai's model builder.

The builder writes `model.onnx` (+ external data) with MatMulNBits int4 weights (block 32),
a KV cache, `genai_config.json` and the tokenizer files, so onnxruntime-genai runs the
folder as is. We chose it over torch.onnx export + ORT's int4 quantizer because it runs
here in seconds and its graph (GroupQueryAttention, MatMulNBits) is ORT's fast CPU path
(the optimum fp32 export ran ~4x slower here: see shared/FACTS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_path
from edgekit.progress import status


# onnxruntime-genai 0.18's builder reads transformers 4's config layout. Under transformers 5 it
# fails on Gemma 3 (rope parameters nested per layer type: KeyError 'rope_type', and transformers'
# own Gemma 3 code loading the weights needs them nested: KeyError 'full_attention') and on Phi-3
# configs without original_max_position_embeddings. The one place that adapts them: the builder
# runs with AutoConfig.from_pretrained wrapped to put the old attributes back. The same wrapper
# fixes the builder's one bug we met: SmolLM3's no-RoPE layers (KeyError 'position_ids').
_ADAPTED_BUILDER = """import runpy, sys
import transformers

_load = transformers.AutoConfig.from_pretrained.__func__


def _adapted(cls, *args, **kwargs):
    loaded = _load(cls, *args, **kwargs)
    config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused kwargs) when asked for
    target = getattr(config, "text_config", None) or config
    rope = getattr(target, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:  # per layer type -> global + local base
        local = rope.get("sliding_attention") or {}
        # the global ones at the top for the builder, the nested ones kept for transformers' model code
        target.rope_parameters = {**rope["full_attention"], **rope}
        if "rope_theta" in local:
            target.rope_local_base_freq = local["rope_theta"]
    if target.model_type == "phi3" and getattr(target, "original_max_position_embeddings", None) is None:
        target.original_max_position_embeddings = target.max_position_embeddings
    return loaded


transformers.AutoConfig.from_pretrained = classmethod(_adapted)

import onnxruntime_genai.models  # puts the builder's own modules ("builders") on sys.path
from builders.smollm import SmolLM3Model

_smollm3_attention = SmolLM3Model.make_attention


def _no_rope_layers_off(self, layer_id, attention, root_input, **kwargs):
    # 0.18 turns RoPE from fused to a separate op on SmolLM3's no-RoPE layers instead of off
    rope = self.attention_attrs["rope"]
    self.attention_attrs["rope"] = rope and bool(self.no_rope_layers[layer_id])
    try:
        return _smollm3_attention(self, layer_id, attention, root_input, **kwargs)
    finally:
        self.attention_attrs["rope"] = rope


SmolLM3Model.make_attention = _no_rope_layers_off
sys.argv[0] = "builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def lm_head_clash(cfg) -> str | None:
    """Why the builder would write a wrong model for this config, or None.

    The builder takes every linear layer with `vocab_size` outputs for the LM head, the last one
    met winning: a vocabulary as wide as the hidden size (o_proj, down_proj), the MLP (gate/up) or
    the attention projections gives a graph whose logits come from a decoder layer (seen on tiny
    models with 512 tokens and intermediate_size 512: top-1 agreement with transformers 0%)."""
    cfg = getattr(cfg, "text_config", None) or cfg
    vocab, hidden = getattr(cfg, "vocab_size", None), getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None) or 0
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if hidden and heads else 0)
    widths = {"hidden_size": hidden, "intermediate_size": getattr(cfg, "intermediate_size", None),
              "attention width": heads * head_dim,
              "key/value width": (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim}
    same = [name for name, width in widths.items() if width and width == vocab]
    if not same:
        return None
    return (f"onnx_int4: the vocabulary ({vocab} tokens) is as wide as the model's {' and '.join(same)}, and "
            "onnxruntime-genai's builder takes every layer of that width for the LM head: the ONNX file would "
            "compute wrong logits")


def export_onnx_int4(model_dir: Path, out: Path, block_size: int = 32, qat_grid: tuple[dict, dict | None] | None = None,
                     precision: str = "int4") -> Path:
    """Build the folder; `qat_grid` ((plan, learned blocks) of a QAT student) then replaces the
    builder's int4 weights with the trained grid (edgekit.export.onnx_grid) and records which
    nodes hold it in the folder's `edgekit_weights.json`. `precision` "fp32" builds the same
    graph unquantized (parity checks against transformers)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise EdgekitError("the onnx_int4 export needs onnxruntime-genai", "pip install 'edgekit[onnx]'") from None
    from transformers import AutoConfig

    clash = lm_head_clash(AutoConfig.from_pretrained(model_dir))
    if clash:
        raise EdgekitError(f"{model_dir.name}: {clash}", "resize the token embeddings to another width "
                           "(model.resize_token_embeddings(n, pad_to_multiple_of=64)) or export GGUF only")
    with atomic_path(out) as tmp:
        cmd = [sys.executable, "-c", _ADAPTED_BUILDER, "-i", str(model_dir), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "--extra_options", f"int4_block_size={block_size}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (tmp / "model.onnx").is_file():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise EdgekitError(f"onnxruntime-genai's model builder failed on {model_dir.name}: {tail}",
                               "check the model is an architecture the builder supports (llama, qwen2, gemma, ...)")
        (tmp / "cache_dir").exists() and __import__("shutil").rmtree(tmp / "cache_dir")
        plain_byte_level(tmp / "tokenizer.json")
        check_tokenizer(tmp, model_dir)
        if qat_grid is not None:
            from edgekit.export.onnx_grid import carry_qat_grid

            with status(f"writing the QAT grid into {out.name}'s MatMulNBits weights"):
                info = carry_qat_grid(tmp, model_dir, *qat_grid)
            (tmp / WEIGHTS_NOTE).write_text(json.dumps(info, indent=1) + "\n")
    return out


WEIGHTS_NOTE = "edgekit_weights.json"  # which MatMulNBits nodes hold a QAT grid, at what width


def plain_byte_level(path: Path) -> None:
    """Make a byte-level BPE tokenizer.json one that ONNX Runtime's tokenizer reads right.

    transformers' GGUF import writes GPT-2-style (byte-level) vocabularies with SentencePiece
    leftovers: `byte_fallback`, an unk token and a ByteFallback/Replace('▁') decoder. Hugging
    Face tokenizers ignores them for byte-level pieces; onnxruntime-extensions does not and
    maps most words to id -1. For a ByteLevel pre-tokenizer those settings mean nothing, so
    they are dropped; the ids do not change (check_tokenizer proves it).
    """
    if not path.is_file():
        return
    tok = json.loads(path.read_text(encoding="utf-8"))
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not model.get("byte_fallback"):
        return
    model.update(byte_fallback=False, fuse_unk=False, unk_token=None)
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


SAMPLE = "Question: Which module?\nAnswer: re.compile(r'[a-z]+')  — café, naïve, 日本語 🙂 1234"


def check_tokenizer(folder: Path, model_dir: Path) -> None:
    """The folder's tokenizer, run by onnxruntime-genai, must give the source model's ids."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(model_dir)(SAMPLE, add_special_tokens=False)["input_ids"]
    tok = og.Tokenizer(og.Model(str(folder)))
    got = [int(i) for i in tok.encode(SAMPLE)]
    if got[1:] == want:  # a BOS the runtime adds by itself
        got = got[1:]
    if got != want or SAMPLE not in tok.decode(got):
        raise EdgekitError(f"ONNX Runtime tokenizes differently from the model {model_dir.name} "
                           f"(first difference at token {next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))})",
                           "the tokenizer.json is not one onnxruntime-extensions reads; report it with the model id")


def builder_architectures() -> frozenset[str]:
    """The transformers architectures onnxruntime-genai's builder dispatches on, read from its
    source without importing it (validate stays fast)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    source = Path(spec.submodule_search_locations[0]) / "models" / "builder.py"
    text = source.read_text(encoding="utf-8") if source.is_file() else ""
    return frozenset(re.findall(r'architectures\[0\] == "([A-Za-z0-9_]+)"', text))
