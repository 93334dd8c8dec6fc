"""The quickstart's GGUF files on mobile-class ARM kernels, emulated.

    bash third_party/build_llama_aarch64.sh armv8.2-a+dotprod        # Raspberry Pi 5 (once, ~6 min)
    bash third_party/build_llama_aarch64.sh armv8.6-a+dotprod+i8mm   # Snapdragon 8 Gen 3 (once)
    .venv/bin/python benchmarks/aarch64.py            # the quantized files
    .venv/bin/python benchmarks/aarch64.py --float    # the F16 file, on 2 chunks (~10 min), merged in
    bash third_party/build_ort_aarch64.sh             # ONNX Runtime's aarch64 wheel + Debian arm64 Python (once, ~1 min)
    .venv/bin/python benchmarks/aarch64.py --onnx     # the int4 ONNX folder in ONNX Runtime on ARM, merged in

Uses the finished stages of `make run` (runs/quickstart: distill, qat, export) and runs only the
bench stage's emulation (`stages.bench.emulate`) on them, without the rest of the pipeline: each quantized GGUF (QAT Q4_K_M and the PTQ baseline's Q4_K_M; F16 files only with
`stages.bench.emulate_float=true`: qemu runs their ARM code far slower still) runs in llama.cpp's
llama-perplexity cross-built for the profile's architecture level, under qemu-user with a
matching CPU model, on the holdout. Per profile and file (benchmarks/results/aarch64.json):
- kl_vs_x86 / top1_vs_x86: llama.cpp on ARM vs the same file in x86 llama.cpp (this machine);
- kl_vs_torch: ARM vs the PyTorch model the file holds (the QAT model on its grid for QAT files,
  the latent / float twin weights for F16 and PTQ files); floor_kl: x86 llama.cpp vs the same
  PyTorch model, what kl_vs_torch is read against;
- ppl: perplexity on the ARM kernels (x86's beside it), so QAT vs PTQ is read on ARM.
With --onnx, the int4 ONNX folder runs in ONNX Runtime's own aarch64 build (its PyPI wheel in
Debian's arm64 Python under qemu, seeing the profile's CPU features and /proc/cpuinfo) on the same
chunks: kl_vs_x86 against ONNX Runtime on this machine, kl_vs_torch against the QAT model it holds.
Emulated: arithmetic exact, speed not measured.
"""

from pathlib import Path

from common import REPO, run_recipe, write_result

from edgekit.machine import machine_description


def emulate_finished_run(run_dir: Path, overrides: tuple[str, ...] = (), only: set[str] | None = None) -> list[dict]:
    """The bench stage's emulated rows for a finished quickstart run (its earlier stages as they are)."""
    from edgekit.fsutil import read_json
    from edgekit.stages import load_recipe
    from edgekit.stages.bench import emulated_rows
    from edgekit.stages.context import Artifact, RunContext
    from edgekit.stages.outputs import ExportOutput
    from edgekit.stages.registry import REGISTRY

    recipe, base = load_recipe(REPO / "recipes" / "quickstart.yaml", ["stages.bench.emulate=true", *overrides])
    ctx = RunContext(recipe, base, run_dir)
    for stage in sorted((run_dir / "stages").iterdir()):
        if (stage / "artifact.json").is_file() and stage.name.split("-", 1)[1] in ("distill", "qat", "export"):
            art = Artifact.from_record(read_json(stage / "artifact.json"), stage)
            ctx.finished[art.type] = art
    ctx.current = REGISTRY["bench"]
    cfg = next(s for s in recipe.stages if s.type == "bench")
    return emulated_rows(ctx, cfg, ctx.get(ExportOutput), only)


def file_row(r: dict) -> dict:
    """One file's figures on one profile, as aarch64.json keeps them."""
    return {"file": r["file"], "kl_vs_x86": r["kl_vs_x86"], "top1_vs_x86": r["top1_vs_x86"],
            "kl_vs_torch": r.get("kl_vs_torch"), "top1_vs_torch": r.get("top1_vs_torch"), "floor_kl": r.get("floor_kl"),
            "ppl": r["ppl"], "ppl_x86": r["ppl_x86"], "tokens": r["tokens"]}


def run() -> dict:
    run_dir = REPO / "runs" / "quickstart"
    if not (run_dir / "stages").is_dir():
        run_recipe("quickstart.yaml", "quickstart")  # make run's stages, once
    rows = emulate_finished_run(run_dir)
    profiles: dict = {}
    for r in rows:
        prof = profiles.setdefault(r["target"], {"cpu_flags": f"{r['kernels']} (qemu -cpu {r['qemu_cpu']})", "files": {}})
        prof["files"][r["variant"]] = file_row(r)
    for prof in profiles.values():
        f = prof["files"]
        if {"qat_q4_k_m", "ptq_q4_k_m"} <= set(f):  # same tokens, same ARM kernels; x86 beside it
            prof["qat_vs_ptq"] = {"ppl_ptq_q4_k_m": f["ptq_q4_k_m"]["ppl"], "ppl_qat_q4_k_m": f["qat_q4_k_m"]["ppl"],
                                  "ppl_ptq_q4_k_m_x86": f["ptq_q4_k_m"]["ppl_x86"], "ppl_qat_q4_k_m_x86": f["qat_q4_k_m"]["ppl_x86"],
                                  "qat_better_on_arm": f["qat_q4_k_m"]["ppl"] < f["ptq_q4_k_m"]["ppl"]}
    result = {"profiles": profiles, "holdout": f"quickstart holdout (stdlib docs): {rows[0]['chunks']} chunks of {rows[0]['ctx']} tokens, "
                                               "the second half of each scored (llama-perplexity's way)",
              "note": "emulated: llama.cpp cross-built for aarch64 (Debian gcc-aarch64-linux-gnu), run under qemu-user; "
                      "kernels exact, speed not measured", "machine": machine_description()}
    write_result("aarch64.json", result)
    return result


FLOAT_CHUNKS = 2  # qemu runs the F16 file's ARM code ~1 min per 128-token pass here


def merge_rows(label: str, overrides: tuple[str, ...], detail, note_key: str, note: str) -> dict:
    """Emulate the `label` rows of the finished quickstart run (with `overrides`) and merge them into
    aarch64.json beside the quantized files': each as `file_row` plus `detail(row)`, and a note."""
    import json

    rows = emulate_finished_run(REPO / "runs" / "quickstart", overrides, {label})
    path = REPO / "benchmarks" / "results" / "aarch64.json"
    result = json.loads(path.read_text())
    for r in rows:
        result["profiles"][r["target"]]["files"][label] = {**file_row(r), **detail(r)}
    result[note_key] = note
    result["machine"] = machine_description()
    write_result("aarch64.json", result)
    return result


def run_float() -> dict:
    """The F16 file's rows on fewer chunks."""
    return merge_rows("f16", ("stages.bench.emulate_float=true", f"stages.bench.emulate_chunks={FLOAT_CHUNKS}"),
                      lambda r: {"chunks": f"{r['chunks']} of {r['ctx']} tokens (fewer than the quantized files': "
                                           "qemu runs F16 slowly)"},
                      "f16", f"emulated on {FLOAT_CHUNKS} chunks (benchmarks/aarch64.py --float)")


def run_onnx() -> dict:
    """The int4 ONNX folder's rows (ONNX Runtime on ARM), on the quantized files' chunks."""
    return merge_rows("onnx_int4", ("stages.bench.emulate_onnx=true",),
                      lambda r: {"runtime": f"{r['kernels']} (qemu -cpu {r['qemu_cpu']}); x86: onnxruntime on this machine"},
                      "onnx", "the int4 ONNX folder in ONNX Runtime's aarch64 wheel under qemu (benchmarks/aarch64.py --onnx), "
                              "same chunks as the GGUF files; kl_vs_x86 against ONNX Runtime on x86")


if __name__ == "__main__":
    import sys

    run_float() if "--float" in sys.argv[1:] else run_onnx() if "--onnx" in sys.argv[1:] else run()
