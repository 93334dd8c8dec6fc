"""KD against plain fine-tuning on the quickstart pair: same student init, data, steps, seed.

    .venv/bin/python benchmarks/kd_vs_sft.py [key.path=value ...]   (runs recipes/kd_vs_sft.yaml)

Runs recipes/kd_vs_sft.yaml (the quickstart's pair and distill settings, with the SFT
baseline on: the distill stage trains a second copy of the initial student on labels
alone), then writes
benchmarks/results/kd_vs_sft.json from the run's holdout evaluation: KL(teacher || model)
and perplexity on documents neither student trained on.
"""

from common import run_recipe, write_result

from edgekit.machine import machine_description


def run() -> dict:
    art = run_recipe("kd_vs_sft.yaml", "kd-vs-sft")
    distill = art["distill"]
    ev = art["evaluate"]["metrics"]
    cfg = distill["config"]
    result = {
        "kd": {"holdout_kl": ev["student|teacher"]["kl"], "holdout_ppl": ev["student"]["ppl"],
               "top1_vs_teacher": ev["student|teacher"]["top1"]},
        "sft": {"holdout_kl": ev["student_sft|teacher"]["kl"], "holdout_ppl": ev["student_sft"]["ppl"],
                "top1_vs_teacher": ev["student_sft|teacher"]["top1"]},
        "student_init": {"holdout_kl": ev["student_init|teacher"]["kl"], "holdout_ppl": ev["student_init"]["ppl"]},
        "teacher": {"holdout_ppl": ev["teacher"]["ppl"]},
        "steps": cfg["steps"],
        "tokens": distill["metrics"]["tokens_trained"],
        "holdout_tokens": ev["teacher"]["tokens"],
        "kd_loss": f"{cfg['loss']} T={cfg['temperature']} alpha_ce={cfg['alpha_ce']}"
                   + (f" + hidden states ({cfg['hidden_states']['loss']}, weight {cfg['hidden_states']['weight']})"
                      if cfg.get("hidden_states") else ""),
        "kl_reduction_vs_sft": 1 - ev["student|teacher"]["kl"] / ev["student_sft|teacher"]["kl"],
        "machine": machine_description(),
    }
    write_result("kd_vs_sft.json", result)
    return result


if __name__ == "__main__":
    run()
