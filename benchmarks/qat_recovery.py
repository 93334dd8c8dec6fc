"""QAT-KD recovery on the quickstart pair, all through llama.cpp on the same holdout.

    .venv/bin/python benchmarks/qat_recovery.py [--pretrained] [key.path=value ...]

Runs recipes/quickstart.yaml (finished stages are reused) and writes
benchmarks/results/qat_recovery.json; with --pretrained, recipes/qat-smollm2.yaml (QAT-KD
of the pretrained SmolLM2-135M on its own Q4_K_M grid, its F16 self as teacher; the PTQ
baseline is llama.cpp's Q4_K_M of the untouched model) into qat_recovery_pretrained.json:
- ppl_fp16: the float twin (the distilled student trained the same QAT steps without
  fake quantization, so both arms saw equal training) as F16 GGUF;
- ppl_ptq_q4_k_m: that twin through llama.cpp's own Q4_K_M (post-training quantization);
- ppl_qat_q4_k_m: the QAT-KD student through the same Q4_K_M;
- recovery = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_FP16);
- parity: KL / top-1 of the QAT Q4_K_M file (llama.cpp) against the PyTorch fake-quant model;
  parity_llama_act: the same against that model with llama.cpp's 8-bit activation rounding
  (quant.act_rounding); parity_floor: that model in fp32 vs fp64 (only float rounding
  differs), what no implementation of llama.cpp's arithmetic can be expected to beat.
"""

from common import run_recipe, write_result

from edgekit.machine import machine_description


def run(pretrained: bool = False) -> dict:
    art = run_recipe("qat-smollm2.yaml", "qat-smollm2") if pretrained else run_recipe("quickstart.yaml", "quickstart")
    ev = art["evaluate"]["metrics"]
    fp16, ptq, qat = ev["ptq_gguf_f16"]["ppl"], ev["ptq_gguf_q4_k_m"]["ppl"], ev["gguf_q4_k_m"]["ppl"]
    parity = ev["gguf_q4_k_m|student_qat"]
    result = {
        "ppl_fp16": fp16, "ppl_ptq_q4_k_m": ptq, "ppl_qat_q4_k_m": qat,
        "recovery": (ptq - qat) / (ptq - fp16) if ptq != fp16 else None,
        "parity_kl": parity["kl"], "parity_top1": parity["top1"],
        "parity_llama_act": ev.get("gguf_q4_k_m|student_qat_llama_act"),
        "parity_floor": ev.get("student_qat_llama_act_fp64|student_qat_llama_act"),
        "kl_to_teacher": {k: ev[f"{k}|teacher"]["kl"] for k in ("ptq_gguf_f16", "ptq_gguf_q4_k_m", "gguf_q4_k_m")},
        "holdout_tokens": ev["teacher"]["tokens"],
        "qat_steps": art["qat"]["config"]["steps"],
        "qat_lr": art["qat"]["config"]["lr"],
        "distill": ({k: art["distill"]["config"][k] for k in ("loss", "temperature", "alpha_ce", "steps", "batch_size")}
                    if "distill" in art else None),
        "fake_quantized": art["qat"]["metrics"]["fake_quantized"],
        "left_in_float": art["qat"]["metrics"]["left_in_float"],
        "machine": machine_description(),
    }
    write_result("qat_recovery_pretrained.json" if pretrained else "qat_recovery.json", result)
    return result


if __name__ == "__main__":
    import sys

    pretrained = "--pretrained" in sys.argv
    if pretrained:
        sys.argv.remove("--pretrained")  # the rest are recipe overrides (common.run_recipe)
    run(pretrained)
