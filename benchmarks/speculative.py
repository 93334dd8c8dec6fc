"""Speculative decoding in llama.cpp with a distilled draft: acceptance, speed, identical output.

    bash third_party/build_llama_tools.sh          # llama-speculative, llama-bench (once, ~7 min)
    .venv/bin/python benchmarks/speculative.py [key.path=value ...]

Runs recipes/draft-smollm2.yaml (finished stages are reused; its export holds the target, the
embedded SmolLM2-135M-Instruct, at Q4_K_M beside the distilled draft), exports two same-size drafts
that were not distilled (the recipe's student before distillation, and a plain truncation: the first
6 layers), then for each draft runs llama.cpp's own `llama-speculative` greedily on 8 chat prompts
(the target's chat template) none of the recipe trained on, at draft lengths 2, 4 and 8: acceptance
(accepted / drafted tokens), decode tokens/s, and whether the answer equals the target's own greedy
answer (llama-cpp-python, the same file and prompt, no draft). Target alone: `llama-bench` decode
at the prompt's depth. `ceiling`: what a draft of this cost could give at full acceptance on this
machine, from llama-bench's cost of a target pass over 2, 3, 5, 9 tokens (`--ceiling-only` adds
it to the committed results without rerunning the rest). Results: benchmarks/results/speculative.json.
"""

import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import REPO, run_recipe, write_result
from tqdm import tqdm

from edgekit.bench.llama_runner import no_repack_args
from edgekit.machine import machine_description

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "What are three tips for staying focused while studying?",
    "Describe the water cycle in a few sentences.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Write a polite email asking a colleague to review a document.",
    "What is the difference between weather and climate?",
]
N_PREDICT, THREADS = 128, 2


def tools() -> Path:
    from edgekit.bench.llama_bench import llama_bench_bin

    exe = llama_bench_bin()
    if exe is None or not (exe.parent / "llama-speculative").is_file():
        sys.exit("run `bash third_party/build_llama_tools.sh` first (builds llama-speculative and llama-bench)")
    return exe.parent


def undistilled_drafts(run: Path, out: Path) -> dict:
    """The recipe's student before distillation, and the same layers at full MLP width, as Q8_0."""
    from edgekit.export.files import export_files
    from edgekit.models.student import copy_tokenizer_files
    from edgekit.stages import load_recipe
    from edgekit.stages.context import RunContext

    files = {}
    for label, overrides in (("undistilled", []), ("truncated", ["student.keep_layers=[0,1,2,3,4,5]"])):
        recipe, base = load_recipe(REPO / "recipes" / "draft-smollm2.yaml", overrides)
        ctx = RunContext(recipe, base, run)
        model, tok_dir, _ = ctx.initial_student()
        d = out / label
        model.save_pretrained(d, safe_serialization=True)
        copy_tokenizer_files(tok_dir, d)
        files[label] = out / export_files(d, out, f"draft-{label}", ["q8_0"])["q8_0"]
    return files


def chat_prompts(tok_dir: Path) -> list[str]:
    """The prompts as the app would send them: the target's chat template, ready for the answer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PROMPTS]


def answer(stdout: str) -> str:
    """llama-speculative prints the prompt, then the answer, then the end-of-turn token."""
    return stdout.rsplit("<|im_start|>assistant\n", 1)[-1].replace("<|im_end|>", "").strip()


def same_answer(a: str, b: str) -> bool:
    """Equal where both ran: llama-speculative may accept a few tokens past -n, so the shorter
    answer must be the start of the longer one (both stop at the end-of-turn token otherwise)."""
    return a.startswith(b) or b.startswith(a)


def speculate(bin_dir: Path, target: Path, draft: Path, prompt: str, n_draft: int) -> dict:
    cmd = [str(bin_dir / "llama-speculative"), "-m", str(target), "-md", str(draft), "-p", prompt, "-n", str(N_PREDICT),
           "--spec-draft-n-max", str(n_draft), "--spec-draft-n-min", "0", "--temp", "0", "-t", str(THREADS), "-c", "1024",
           "--seed", "0", "-fa", "off",  # flash attention as llama-cpp-python runs it: "auto" changed answers with the draft
           *no_repack_args()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    grab = lambda pat: float(re.search(pat, log).group(1))  # noqa: E731
    return {"text": answer(out.stdout), "decode_tps": grab(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+)"),
            "drafted": grab(r"n_drafted = (\d+)"), "accepted": grab(r"n_accept\s+= (\d+)")}


def divergence(llm, prompt: str, ours: str, ref: str) -> dict | None:
    """Where llama-speculative's answer leaves the target's own greedy answer (None: it does not):
    answer tokens in common, and the target's logit gap between the two tokens there (from
    llama-cpp-python on the shared prefix). A gap of a few thousandths is a near-tie that
    batched verification's different arithmetic can flip, not a wrong acceptance."""
    import numpy as np

    head = llm.tokenize(prompt.encode(), special=True)
    a, b = (llm.tokenize((prompt + t).encode(), special=True)[len(head):] for t in (ours, ref))
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if i is None:
        return None
    llm.reset()
    llm.eval(head + b[:i])
    logits = np.asarray(llm.scores[llm.n_tokens - 1])
    return {"tokens_same": i, "logit_gap": round(float(abs(logits[a[i]] - logits[b[i]])), 5)}


def target_text(target: Path, prompt: str) -> str:
    from edgekit.bench.llama_runner import llama_generate

    return llama_generate(target, prompt, N_PREDICT, threads=THREADS).strip()


def exported_pair(run_dir: Path) -> tuple[Path, Path]:
    """(target, draft) GGUFs the recipe's export wrote (its draft.json names them)."""
    import json

    pair = json.loads((run_dir / "export" / "draft.json").read_text())
    return run_dir / "export" / pair["target"], run_dir / "export" / pair["draft"]


def ceiling(target: Path, draft: Path, depth: int = 64) -> dict:
    """The most any draft of this cost could give on this machine: a round drafts n tokens (n draft
    decode steps) and verifies them in one target pass over n + 1 tokens; at full acceptance it
    yields n + 1 tokens. Costs in target decode steps, from llama-bench at the prompts' depth:
    speedup(n) = (n + 1) / (n * draft + verify(n + 1)), with no sampling or bookkeeping overhead."""
    from edgekit.bench.llama_bench import batch_speeds

    ks = [1, 2, 3, 5, 9]
    t = batch_speeds(target, THREADS, ks, depth)
    d = batch_speeds(draft, THREADS, [1], depth)
    step = 1 / t[1]
    verify = {k: round(k / t[k] / step, 3) for k in ks}
    draft_cost = round(1 / d[1] / step, 3)
    return {"target_tps_by_batch": t, "verify_cost_in_decode_steps": verify, "draft_step_in_decode_steps": draft_cost,
            "max_speedup_at_full_acceptance": {n: round((n + 1) / (n * draft_cost + verify[n + 1]), 3) for n in (1, 2, 4, 8)},
            "max_speedup_free_draft": {n: round((n + 1) / verify[n + 1], 3) for n in (1, 2, 4, 8)}, "depth": depth}


def run() -> dict:
    bin_dir = tools()
    run_recipe("draft-smollm2.yaml", "draft-smollm2")
    run_dir = REPO / "runs" / "draft-smollm2"
    out = run_dir / "speculative"
    out.mkdir(exist_ok=True)
    target, distilled = exported_pair(run_dir)
    drafts = {"distilled": distilled, **undistilled_drafts(run_dir, out)}
    from edgekit.bench.llama_bench import llama_bench

    alone = statistics.median(llama_bench(target, THREADS, 32, N_PREDICT, 3)["decode_tps"] for _ in range(3))
    prompts = chat_prompts(run_dir / "stages" / "01-distill" / "model")
    reference = {p: target_text(target, p) for p in prompts}
    results, texts = {}, {}
    for label, draft in drafts.items():
        for n_draft in (2, 4, 8):
            rows = [speculate(bin_dir, target, draft, p, n_draft) for p in tqdm(prompts, desc=f"{label} draft, {n_draft} tokens")]
            texts[f"{label}@{n_draft}"] = [r["text"] for r in rows]
            results[f"{label}@{n_draft}"] = {
                "acceptance": sum(r["accepted"] for r in rows) / max(1, sum(r["drafted"] for r in rows)),
                "decode_tps": statistics.median(r["decode_tps"] for r in rows),
                "identical": sum(same_answer(r["text"], reference[p]) for r, p in zip(rows, prompts)),
                "draft_bytes": draft.stat().st_size}
    # every draft and draft length gives the same answer (the output does not depend on the draft)
    across = [all(same_answer(t[i], texts["distilled@2"][i]) for t in texts.values()) for i in range(len(prompts))]
    from edgekit.bench.llama_runner import load_llama

    llm = load_llama(target, n_ctx=1024, threads=THREADS, logits_all=True)
    vs_alone = [divergence(llm, p, texts["distilled@2"][i], reference[p]) for i, p in enumerate(prompts)]
    best = max((k for k in results if k.startswith("distilled@")), key=lambda k: results[k]["decode_tps"])
    n_best = int(best.split("@")[1])
    result = {"target": f"SmolLM2-135M-Instruct Q4_K_M ({target.stat().st_size} bytes)",
              "draft": f"draft-smollm2 Q8_0, 6 of 30 layers ({drafts['distilled'].stat().st_size} bytes)",
              "speedup": results[best]["decode_tps"] / alone, "identical_output": results[best]["identical"] == len(PROMPTS),
              "acceptance_distilled": results[best]["acceptance"], "acceptance_undistilled": results[f"undistilled@{n_best}"]["acceptance"],
              "acceptance_truncated": results[f"truncated@{n_best}"]["acceptance"], "draft_len": n_best,
              "target_alone_decode_tps": alone, "identical_across_drafts": sum(across),
              "divergence_from_target_alone": vs_alone, "runs": results, "prompts": len(PROMPTS), "n_predict": N_PREDICT,
              "threads": THREADS, "machine": machine_description(), "ceiling": ceiling(target, drafts["distilled"])}
    write_result("speculative.json", result)
    return result


if __name__ == "__main__":
    if sys.argv[1:] == ["--ceiling-only"]:  # add the ceiling to the committed results, nothing else rerun
        import json

        result = json.loads((REPO / "benchmarks" / "results" / "speculative.json").read_text())
        result["ceiling"] = ceiling(*exported_pair(REPO / "runs" / "draft-smollm2"))
        write_result("speculative.json", result)
    else:
        run()
