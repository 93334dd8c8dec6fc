"""Memory-lean KD: teacher formats (bitsandbytes NF4/int8, fp16, bf16) x optimizers (AdamW, 8-bit AdamW).

    .venv/bin/python benchmarks/lean_kd.py [--pair smollm2|gemma3] [--configs fp32/adamw,nf4/adamw]
                                           [--steps 16] [--batch 4] [--seq-len 128]

Pairs: smollm2 = the quickstart's (SmolLM2-135M teacher, its 11-layer student initialised from
the fp32 teacher's layers) -> lean_kd.json; gemma3 = Gemma 3 270M (embedded, vocab 262k) and
its 6-layer student -> lean_kd_gemma3.json. Quickstart data split by document as a recipe
splits it. Each configuration runs in its own process through edgekit's trainer:
- teacher_resident_mb: the teacher alone in that format, loaded in a fresh process and run
  once (so a memory-mapped fp32 file's pages count), RSS after minus before, freed heap
  returned: what holding the teacher costs;
- peak_mem_mb: the process's peak RSS during KD training (everything: runtime, both
  models, gradients, optimizer states, activations), beside the estimate `edgekit
  validate` prints for the same settings (`estimate_mb`);
- tokens_per_s: median over the steps after the first;
- teacher_kl_vs_fp: KL(fp32 teacher || this teacher) per token on the holdout rows;
- student_holdout_kl: KL(fp32 teacher || student after KD from this teacher) on the
  same rows (the fp32-teacher row is the baseline for the others).
Writes benchmarks/results/lean_kd.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import rss_mb  # noqa: E402

CONFIGS = "fp32/adamw,fp32/adamw8bit,fp16/adamw,bf16/adamw,nf4/adamw,nf4/adamw8bit,int8/adamw8bit"
PAIRS = {"smollm2": ("embedded:smollm2-135m-instruct", "lean_kd.json"),
         "gemma3": ("embedded:gemma3-270m", "lean_kd_gemma3.json")}


def data(model: str, seq_len: int):
    from transformers import AutoTokenizer

    from edgekit.data.documents import load_documents, split_documents
    from edgekit.data.tokens import pack
    from edgekit.models.sources import resolve_model

    path = resolve_model(model, REPO).path
    tok = AutoTokenizer.from_pretrained(path)
    train, hold = split_documents(load_documents("recipes/data/stdlib_docs.jsonl", REPO), 0.1, 0)
    return path, pack(train, tok, seq_len, "train")[0], pack(hold, tok, seq_len, "holdout")[0][:16]


def resident(model: str, load: str, seq_len: int) -> None:
    """RSS the teacher in `load` format adds to a fresh process, after one forward pass."""
    import torch

    from edgekit.fsutil import release_memory
    from edgekit.models.loading import load_causal_lm

    path, _, holdout = data(model, seq_len)
    before = rss_mb()
    teacher = load_causal_lm(path, load=load)
    with torch.no_grad():
        logits = teacher(input_ids=holdout[:1]).logits
    finite = bool(torch.isfinite(logits).all())
    del logits
    release_memory()
    print(json.dumps({"teacher_resident_mb": round(rss_mb() - before, 1), "teacher_logits_finite": finite}))


def worker(model: str, load: str, optimizer: str, steps: int, batch: int, seq_len: int) -> None:
    import torch

    from edgekit.bench.quality import evaluate, torch_scorer
    from edgekit.bench.worker import peak_rss_kb
    from edgekit.distill.memory import counts, estimate
    from edgekit.distill.precision import bf16_heads
    from edgekit.distill.trainer import KDSettings, train
    from edgekit.errors import EdgekitError
    from edgekit.fsutil import release_memory
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.student import init_from_teacher_layers, layers_to_keep

    torch.manual_seed(0)
    path, rows, holdout = data(model, seq_len)
    fp = load_causal_lm(path)
    student = init_from_teacher_layers(fp, layers_to_keep(fp.config.num_hidden_layers, 3, None))
    t_counts, s_counts = counts(fp.config), counts(student.config)
    teacher = fp if load == "fp32" else load_causal_lm(path, load=load)
    quality = {}
    if load != "fp32":
        try:
            quality = evaluate({"fp": torch_scorer(fp), "q": torch_scorer(teacher)}, holdout, [("q", "fp")],
                               desc=f"{load} teacher")
        except EdgekitError as e:  # a teacher that overflows in this format (Gemma in fp16): nothing to train from
            print(json.dumps({"teacher_load": load, "optimizer": optimizer, "error": e.what}))
            return
        del fp  # training sees only the teacher in its chosen format
        release_memory()
    Path("/proc/self/clear_refs").write_text("5")  # peak from here: what KD training needs
    st = KDSettings(steps=steps, batch_size=batch, loss_chunk=128, lr=5e-4, warmup_steps=2, checkpoint_every=10**6,
                    optimizer=optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train(student, teacher, rows, st, Path(tmp), desc=f"KD {load}/{optimizer}")
        except EdgekitError as e:  # e.g. a teacher whose fp16 activations overflow: no peak to report
            print(json.dumps({"teacher_load": load, "optimizer": optimizer, "error": e.what}))
            return
        speeds = [json.loads(line)["tokens_per_s"] for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    peak = peak_rss_kb() / 1024
    tokens_per_s = sorted(speeds[1:])[len(speeds[1:]) // 2]
    reference = fp if load == "fp32" else load_causal_lm(path)
    after = evaluate({"fp": torch_scorer(reference), "s": torch_scorer(student)}, holdout, [("s", "fp")], desc="student")
    est = estimate(t_counts, s_counts, teacher_load=load, optimizer=optimizer, batch=batch, seq_len=seq_len, loss_chunk=128,
                   bf16_heads=bf16_heads(torch.device("cpu"), st.precision))
    print(json.dumps({"teacher_load": load, "optimizer": optimizer, "peak_mem_mb": round(peak, 1),
                      "estimate_mb": est["total_mb"], "tokens_per_s": tokens_per_s,
                      "teacher_kl_vs_fp": round(quality["q|fp"]["kl"], 5) if quality else 0.0,
                      "student_holdout_kl": round(after["s|fp"]["kl"], 4),
                      "estimate_error": round(est["total_mb"] / peak - 1, 3)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="smollm2")
    ap.add_argument("--configs", default=CONFIGS, help="teacher load / optimizer pairs, comma-separated")
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--resident")
    a = ap.parse_args()
    model = PAIRS[a.pair][0]
    if a.resident:
        return resident(model, a.resident, a.seq_len)
    if a.worker:
        return worker(model, *a.worker, a.steps, a.batch, a.seq_len)
    from benchmarks.common import write_result
    from edgekit.machine import machine_description

    def run(*args: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--pair", a.pair, *args, "--steps", str(a.steps), "--batch",
                              str(a.batch), "--seq-len", str(a.seq_len)], text=True, stdout=subprocess.PIPE, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    from edgekit.models.sources import resolve_model

    resolve_model(model, REPO)  # an embedded model's first use converts it: not inside a measuring process
    rows, held = [], {}
    for config in a.configs.split(","):
        load, optimizer = config.split("/")
        if load not in held:
            held[load] = run("--resident", load)
        rows.append(run("--worker", load, optimizer) | held[load] | {"steps": a.steps, "batch": a.batch,
                                                                      "seq_len": a.seq_len, "model": model,
                                                                      "machine": machine_description()})
        print(rows[-1], flush=True)
    write_result(PAIRS[a.pair][1], rows)


if __name__ == "__main__":
    main()
