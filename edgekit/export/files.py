"""Every requested file of one model: GGUF (our float writer, then llama.cpp's quantizer, or
a QAT grid written as trained) and the int4 ONNX folder."""

from __future__ import annotations

from pathlib import Path

from edgekit.export.gguf_write import write_gguf
from edgekit.export.llama_quantize import quantize_gguf
from edgekit.export.onnx_export import export_onnx_int4
from edgekit.formats import ONNX_FORMATS, file_label
from edgekit.progress import status


def export_files(src: Path, out: Path, name: str, formats: list[str], plan: dict | None = None,
                 blocks: dict | None = None, onnx_grid: bool = False, imatrix: dict | None = None) -> dict[str, str]:
    """Write `formats` of the model in `src` as <name>-<TYPE>.gguf; {format: file name}.
    `plan` ({"mix": fmt, "plan": {weight: GGML type}}, from a qat stage) makes the `mix`
    file be written from the trained grid by edgekit's exact quantizers, not by llama.cpp;
    `blocks` (QAT with learned scales) are packed as they are in that file; `onnx_grid` puts the
    same trained grid into the ONNX folder's MatMulNBits weights; `imatrix` ({GGUF tensor name:
    mean squared activation per column}) weights llama.cpp's quantizations."""
    files = {}
    if "onnx_int4" in formats:
        target = out / f"{name}-int4-onnx"
        with status(f"building {target.name} with onnxruntime-genai's model builder"):
            export_onnx_int4(src, target, qat_grid=(plan["plan"], blocks) if plan and onnx_grid else None)
        files["onnx_int4"] = target.name
    gguf_formats = [f for f in formats if f not in ONNX_FORMATS]
    if gguf_formats:
        files |= export_gguf(src, out, name, gguf_formats, plan, blocks, imatrix)
    return files


def export_gguf(src: Path, out: Path, name: str, formats: list[str], plan: dict | None, blocks: dict | None,
                imatrix: dict | None) -> dict[str, str]:
    float_fmt = "f32" if "f32" in formats else "f16"
    base = out / f"{name}-{file_label(float_fmt)}.gguf"
    with status(f"writing {base.name}"):
        write_gguf(src, base, float_fmt, name=name)
    files = {float_fmt: base.name} if float_fmt in formats else {}
    for fmt in formats:
        if fmt in ("f32", "f16"):
            continue
        target = out / f"{name}-{file_label(fmt)}.gguf"
        if plan and plan["mix"] == fmt:
            with status(f"writing {target.name} from the QAT grid (no second quantization)"):
                write_gguf(src, target, fmt, name=name, types=plan["plan"], blocks=blocks)
        else:
            with status(f"quantizing to {target.name} with llama.cpp" + (" and an importance matrix" if imatrix else "")):
                quantize_gguf(base, target, fmt, imatrix=imatrix)
        files[fmt] = target.name
    if float_fmt not in formats:
        base.unlink()
    return files
