"""KD against plain fine-tuning on the quickstart pair: same student init, data, steps, seed.

    .venv/bin/python benchmarks/kd_vs_sft.py [key.path=value ...]

Runs recipes/quickstart.yaml with the SFT baseline switched on (the distill stage trains a
second copy of the initial student on labels alone), then writes
benchmarks/results/kd_vs_sft.json from the run's holdout evaluation: KL(teacher || model)
and perplexity on documents neither student trained on.
"""

import json
import sys
from pathlib import Path

from edgekit.cli import main
from edgekit.pipeline import machine_description

REPO = Path(__file__).resolve().parents[1]


def run() -> dict:
    runs = REPO / "runs"
    rc = main(["run", str(REPO / "recipes" / "quickstart.yaml"), "--runs-dir", str(runs), "name=kd-vs-sft",
               "stages.distill.baselines=[sft]", *sys.argv[1:]])
    if rc:
        sys.exit(rc)
    manifest = json.loads((runs / "kd-vs-sft" / "manifest.json").read_text())
    distill = manifest["artifacts"]["distill"]
    ev = manifest["artifacts"]["evaluate"]["metrics"]
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
        "kd_loss": f"{cfg['loss']} T={cfg['temperature']} alpha_ce={cfg['alpha_ce']}",
        "kl_reduction_vs_sft": 1 - ev["student|teacher"]["kl"] / ev["student_sft|teacher"]["kl"],
        "machine": machine_description(),
    }
    out = REPO / "benchmarks" / "results" / "kd_vs_sft.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run()
