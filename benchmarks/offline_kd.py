"""Offline KD (teacher top-k cached once) against online KD on the quickstart pair.

    .venv/bin/python benchmarks/offline_kd.py

Runs recipes/kd_vs_sft.yaml twice without its SFT baseline: distillation with the teacher
online every step, and with `teacher_logits: offline, top_k: 64` (the cache is built by the
first offline run and reused by later ones). Same student init, rows, steps and seed; both
evaluated on the same holdout. Writes benchmarks/results/offline_kd.json.
"""

from common import run_recipe, write_result

from edgekit.machine import machine_description


def arm(name: str, *overrides: str) -> dict:
    art = run_recipe("kd_vs_sft.yaml", name, "stages.distill.baselines=[]", *overrides)
    ev, d = art["evaluate"]["metrics"], art["distill"]
    return {"holdout_kl": ev["student|teacher"]["kl"], "holdout_ppl": ev["student"]["ppl"],
            "top1_vs_teacher": ev["student|teacher"]["top1"], "distill_wall_s": d["wall_s"],
            "train_tokens_per_s": d["metrics"]["final"]["tokens_per_s"], "teacher_ppl": ev["teacher"]["ppl"],
            **({"teacher_logits": d["metrics"]["teacher_logits"]} if "teacher_logits" in d["metrics"] else {})}


def run() -> dict:
    online = arm("kd-online")
    offline = arm("kd-offline-k64", "stages.distill.teacher_logits=offline", "stages.distill.top_k=64")
    result = {"online": online, "offline_k64": offline,
              "kl_ratio_offline_vs_online": offline["holdout_kl"] / online["holdout_kl"],
              "steps": 40, "machine": machine_description()}
    write_result("offline_kd.json", result)
    return result


if __name__ == "__main__":
    run()
