"""Quality of each 4-bit export of one model, in its own runtime, against its FP16 GGUF.

    .venv/bin/python benchmarks/export_quality.py [--model embedded:smollm2-135m-instruct] [--rows 16]

The model (default: the embedded SmolLM2-135M-Instruct, a real pretrained model) is written
as F16 GGUF (the reference), then
- RTN: llama.cpp's Q4_0 (round-to-nearest, block 32, no search);
- llama.cpp Q4_K_M (its own mix, fallbacks included), without and with an importance matrix
  (measured by edgekit on the calibration rows, quantization by llama.cpp);
- edgekit Q4_K_M (our exact quantizers; must equal llama.cpp's, byte for byte);
- ONNX int4 (onnxruntime-genai builder, MatMulNBits block 32) run by ONNX Runtime;
- GPTQ and AWQ int4 checkpoints (llm-compressor, compressed-tensors) run by transformers;
- GPTQ -> GGUF Q4_K_M (GPTQ on the GGUF grid) and AWQ -> GGUF Q4_K_M (AWQ-smoothed weights,
  exact llama.cpp quantizers), run by llama.cpp.
Holdout: the quickstart recipe's data split (documents never trained on), 256-token rows;
calibration: the first --calib rows of its train split. Writes benchmarks/results/export_quality.json.
"""

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def split_rows(model_dir: Path, n_holdout: int, n_train: int):
    from transformers import AutoTokenizer

    from edgekit.data.documents import load_documents, split_documents
    from edgekit.data.tokens import pack

    train, hold = split_documents(load_documents("recipes/data/stdlib_docs.jsonl", REPO), 0.1, 0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return pack(hold, tok, 256, "holdout")[0][:n_holdout], pack(train, tok, 256, "train")[0][:n_train]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=64, help="GPTQ/AWQ calibration rows (train split)")
    ap.add_argument("--awq-grid", type=int, default=10)
    ap.add_argument("--awq-rows", type=int, default=16)
    a = ap.parse_args()
    from benchmarks.common import write_result
    from edgekit.bench.llama_runner import llama_scorer
    from edgekit.bench.ort_runner import ort_scorer
    from edgekit.bench.quality import evaluate, torch_scorer
    from edgekit.bench.speed import model_size
    from edgekit.export.gguf_write import write_gguf
    from edgekit.export.llama_quantize import quantize_gguf
    from edgekit.export.onnx_export import export_onnx_int4
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.sources import resolve_model
    from edgekit.machine import machine_description
    from edgekit.quant.imatrix import collect
    from edgekit.quant.ptq import artifacts as ptq_artifacts
    from edgekit.quant.qat import plan_types

    src = resolve_model(a.model, REPO).path
    rows, calib = split_rows(src, a.rows, a.calib)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        f16 = write_gguf(src, t / "F16.gguf", "f16")
        artifacts = {  # name: (format, runtime, path)
            "fp16": ("GGUF F16", "llama.cpp", f16),
            "rtn_q4_0": ("GGUF Q4_0 (RTN)", "llama.cpp", quantize_gguf(f16, t / "Q4_0.gguf", "q4_0")),
            "llama.cpp_q4_k_m": ("GGUF Q4_K_M", "llama.cpp", quantize_gguf(f16, t / "Q4_K_M.gguf", "q4_k_m")),
            "llama.cpp_q4_k_m_imatrix": (f"GGUF Q4_K_M, importance matrix on {a.calib} train rows", "llama.cpp",
                                         quantize_gguf(f16, t / "Q4_K_M-imatrix.gguf", "q4_k_m",
                                                       imatrix=collect(load_causal_lm(src), src, calib, "stdlib_docs").means())),
            "edgekit_q4_k_m": ("GGUF Q4_K_M", "llama.cpp",
                               write_gguf(src, t / "ek-Q4_K_M.gguf", "q4_k_m", types=plan_types(src, "q4_k_m"))),
            "onnx_int4": ("ONNX MatMulNBits int4 (block 32)", "onnxruntime-genai",
                          export_onnx_int4(src, t / "int4-onnx")),
        }
        calib_rows = {"llama.cpp_q4_k_m_imatrix": int(calib.shape[0])}
        for key, path, info, _ in ptq_artifacts(src, t, "ptq", ["gptq", "awq"], ["q4_k_m"], calib, awq_grid=a.awq_grid,
                                                awq_rows=a.awq_rows):
            label = {"gptq": "GPTQ int4 checkpoint", "awq": "AWQ int4 checkpoint"}.get(key, f"GGUF Q4_K_M ({key})")
            artifacts[key.replace("_q4_k_m", "")] = (f"{label}, {info['format']}", info["runtime"], path)
            calib_rows[key.replace("_q4_k_m", "")] = info.get("calibration_rows", int(calib.shape[0]))
        scorers = {k: (ort_scorer(p) if k == "onnx_int4" else torch_scorer(load_causal_lm(p)) if r == "transformers"
                       else llama_scorer(p, ctx=rows.shape[1])) for k, (_, r, p) in artifacts.items()}
        res = evaluate(scorers, rows, [(k, "fp16") for k in artifacts if k != "fp16"], desc="export quality")
        table = []
        for k, (fmt, runtime, path) in artifacts.items():
            pair = res.get(f"{k}|fp16", {"kl": 0.0, "top1": 1.0})
            table.append({"artifact": k, "format": fmt, "runtime": runtime, "holdout_ppl": round(res[k]["ppl"], 4),
                          "kl_vs_fp16": round(pair["kl"], 5), "top1_vs_fp16": round(pair["top1"], 4),
                          "size_mb": round(model_size(path) / 2**20, 2), "model": a.model,
                          "holdout_tokens": res[k]["tokens"], "calibration_rows": calib_rows.get(k),
                          "machine": machine_description()})
    write_result("export_quality.json", table)


if __name__ == "__main__":
    main()
