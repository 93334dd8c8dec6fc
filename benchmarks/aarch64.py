"""The quickstart's GGUF files on mobile-class ARM kernels, emulated.

    bash third_party/build_llama_aarch64.sh armv8.2-a+dotprod        # Raspberry Pi 5 (once, ~6 min)
    bash third_party/build_llama_aarch64.sh armv8.6-a+dotprod+i8mm   # Snapdragon 8 Gen 3 (once)
    .venv/bin/python benchmarks/aarch64.py [key.path=value ...]

Runs recipes/quickstart.yaml (finished stages are reused) with its bench stage's `emulate` on:
each GGUF (QAT Q4_K_M, F16, and the PTQ baseline's F16 and Q4_K_M) runs in llama.cpp's
llama-perplexity cross-built for the profile's architecture level, under qemu-user with a
matching CPU model, on the holdout. Per profile and file (benchmarks/results/aarch64.json):
- kl_vs_x86 / top1_vs_x86: llama.cpp on ARM vs the same file in x86 llama.cpp (this machine);
- kl_vs_torch: ARM vs the PyTorch model the file holds (the QAT model on its grid for QAT files,
  the latent / float twin weights for F16 and PTQ files); floor_kl: x86 llama.cpp vs the same
  PyTorch model, what kl_vs_torch is read against;
- ppl: perplexity on the ARM kernels (x86's beside it), so QAT vs PTQ is read on ARM.
Emulated: arithmetic exact, speed not measured.
"""

from common import run_recipe, write_result

from edgekit.machine import machine_description


def run() -> dict:
    art = run_recipe("quickstart.yaml", "quickstart", "stages.bench.emulate=true")
    rows = art["bench"]["metrics"]["emulated"]
    profiles: dict = {}
    for r in rows:
        prof = profiles.setdefault(r["target"], {"cpu_flags": f"{r['kernels']} (qemu -cpu {r['qemu_cpu']})", "files": {}})
        prof["files"][r["variant"]] = {
            "file": r["file"], "kl_vs_x86": r["kl_vs_x86"], "top1_vs_x86": r["top1_vs_x86"],
            "kl_vs_torch": r.get("kl_vs_torch"), "top1_vs_torch": r.get("top1_vs_torch"), "floor_kl": r.get("floor_kl"),
            "ppl": r["ppl"], "ppl_x86": r["ppl_x86"], "tokens": r["tokens"]}
    for prof in profiles.values():
        f = prof["files"]
        if {"qat_q4_k_m", "ptq_q4_k_m", "ptq_f16"} <= set(f):
            fp16, ptq, qat = f["ptq_f16"]["ppl"], f["ptq_q4_k_m"]["ppl"], f["qat_q4_k_m"]["ppl"]
            prof["qat_vs_ptq"] = {"ppl_f16": fp16, "ppl_ptq_q4_k_m": ptq, "ppl_qat_q4_k_m": qat,
                                  "recovery": (ptq - qat) / (ptq - fp16) if ptq != fp16 else None}
    result = {"profiles": profiles, "holdout": f"quickstart holdout (stdlib docs): {rows[0]['chunks']} chunks of {rows[0]['ctx']} tokens, "
                                               "the second half of each scored (llama-perplexity's way)",
              "note": "emulated: llama.cpp cross-built for aarch64 (Debian gcc-aarch64-linux-gnu), run under qemu-user; "
                      "kernels exact, speed not measured", "machine": machine_description()}
    write_result("aarch64.json", result)
    return result


if __name__ == "__main__":
    run()
