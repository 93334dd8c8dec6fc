"""One table of GGML block types and file mixes, named as llama.cpp names them.

Everything else derives from these two dicts: the recipe's allowed `export.formats`,
`qat.mix` and `quantize.gguf` values, the exact quantizers' registry
(`formats.ggml_blocks.GGML_TYPES`), the GGUF writer's file types and llama.cpp's ftype
constants for its quantizer. Adding a mix is one row here (and, for QAT, the exact
quantizer of every block type llama.cpp's mix can choose). Pure Python: `edgekit validate`
reads it without importing torch.

    BLOCK_TYPES  GGML tensor type -> how edgekit handles it (exact quantizer name or None)
    MIXES        recipe name -> the GGUF file type (llama_ftype), who writes it, QAT support
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockType:
    ggml: str  # gguf.GGMLQuantizationType member: "Q4_K"
    exact: str | None  # edgekit's bit-exact quantizer (formats.ggml_blocks / kquants), None: llama.cpp only
    block: int  # weights per block (K-quants: per super-block)


BLOCK_TYPES = {b.ggml: b for b in (
    BlockType("Q8_0", "q8_0", 32),
    BlockType("Q4_0", "q4_0", 32),
    BlockType("Q5_0", "q5_0", 32),
    BlockType("Q4_1", "q4_1", 32),
    BlockType("Q5_1", None, 32),
    BlockType("Q4_K", "q4_k", 256),
    BlockType("Q5_K", None, 256),
    BlockType("Q6_K", "q6_k", 256),
)}
EXACT_TYPES = {b.ggml: b.exact for b in BLOCK_TYPES.values() if b.exact}  # "Q4_K" -> "q4_k"


@dataclass(frozen=True)
class Mix:
    name: str  # what recipes say: "q4_k_m"
    file_type: str  # gguf.LlamaFileType member; also llama.cpp's LLAMA_FTYPE_<file_type>
    label: str  # in file names: <name>-Q4_K_M.gguf
    is_float: bool = False  # written by edgekit's writer itself; otherwise by llama.cpp's quantizer
    exact: bool = False  # every block type llama.cpp's mix picks (fallbacks included) has an exact quantizer: QAT and GPTQ can target it

    @property
    def llama_ftype(self) -> str:
        """The llama_cpp constant naming this mix for llama_model_quantize."""
        return f"LLAMA_FTYPE_{self.file_type}"


MIXES = {m.name: m for m in (
    Mix("f32", "ALL_F32", "F32", is_float=True),
    Mix("f16", "MOSTLY_F16", "F16", is_float=True),
    Mix("q8_0", "MOSTLY_Q8_0", "Q8_0", exact=True),
    Mix("q5_0", "MOSTLY_Q5_0", "Q5_0", exact=True),
    Mix("q4_0", "MOSTLY_Q4_0", "Q4_0", exact=True),
    Mix("q4_1", "MOSTLY_Q4_1", "Q4_1", exact=True),
    Mix("q4_k_m", "MOSTLY_Q4_K_M", "Q4_K_M", exact=True),
    Mix("q5_k_m", "MOSTLY_Q5_K_M", "Q5_K_M"),  # Q5_K has no exact quantizer yet: llama.cpp writes it, QAT/GPTQ cannot
    Mix("q6_k", "MOSTLY_Q6_K", "Q6_K", exact=True),
)}

FLOAT_MIXES = tuple(n for n, m in MIXES.items() if m.is_float)
QUANT_MIXES = tuple(n for n, m in MIXES.items() if not m.is_float)  # what llama.cpp's quantizer writes
EXACT_MIXES = tuple(n for n, m in MIXES.items() if m.exact)  # qat.mix, quantize.gguf
ONNX_FORMATS = ("onnx_int4",)
EXPORT_FORMATS = (*MIXES, *ONNX_FORMATS)


def file_label(fmt: str) -> str:
    """"q4_k_m" -> "Q4_K_M" (file names); "onnx_int4" stays as it is."""
    return MIXES[fmt].label if fmt in MIXES else fmt
