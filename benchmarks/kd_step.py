"""KD training-step throughput and peak memory: edgekit's chunked step vs a naive one and TRL,
at a 49k and a 262k vocabulary.

    .venv/bin/python benchmarks/kd_step.py [--pair smollm2|gemma3] [--steps 3] [--batch 4] [--seq-len 256]
        [--variants edgekit,loss_edgekit --keep-others]   (re-measure some rows, keep the others)

Pairs: smollm2 = the quickstart's (SmolLM2-135M-Instruct teacher, vocab 49,152, its 11-layer
student: every 3rd layer) -> kd_step.json; gemma3 = Gemma 3 270M (embedded, vocab 262,144) and
its 6-layer student (every 3rd of 18) -> kd_step_gemma3.json. Same batch for every variant.
- edgekit: hidden states from both trunks, loss and its gradient over position chunks
  fused with the output projection (edgekit.distill.trainer.chunked_loss: closed-form
  forward-KL gradient in place, chunk lowered at large vocabularies), the student's gated
  MLPs and RMSNorms saving fewer activations (edgekit.distill.activations);
- offline_topk: the same step against the teacher's top-64 cached once (logit_cache; the
  cache is built before the timed steps, as a recipe's `teacher_logits: offline` does);
- naive: both models' full (B, T, V) logits materialised, forward KL on all of them,
  as a straightforward implementation does;
- trl_gkd: TRL's GKDTrainer (trl.experimental.gkd, TRL 1.16) in its offline setting
  (lmbda=0: no student generation, seq_kd off; beta=0: forward KL), same models, rows,
  batch, temperature and AdamW, driven by its own Trainer loop (`pip install -e .[bench]` installs TRL).
  TRL's SFT-family defaults bf16 autocast and gradient checkpointing are turned off (bf16
  autocast is ~25x slower on AMD CPUs without native bf16; trl_gkd_bf16 turns it on where
  edgekit's auto is bf16), no recomputation anywhere.
Precision: edgekit runs as the trainer does with `precision: auto` (distill.precision.resolved_precision):
on a CPU whose oneDNN fp32 matmuls really multiply bf16-rounded inputs under
torch.set_float32_matmul_precision("medium") (AMX), bf16_matmul; on one with AVX-512 BF16 where
they do not (Zen 4: they stay fp32), bf16: autocast trunks and the fused loss's heads multiplied
in bf16 (trainer.Bf16HeadMatmuls; the loss and its gradient fp32); elsewhere fp32. naive and
trl_gkd run PyTorch's defaults (fp32). Rows giving the baselines edgekit's precision: loss_only's
naive_bf16_matmul (the "medium" setting) and, under bf16, naive_bf16 (both heads under bf16
autocast, the loss on fp32 copies of their logits, as TRL's bf16=True computes them), and
trl_gkd_bf16_matmul (same matmuls) or trl_gkd_bf16 (TRL's own bf16 autocast, as on GPUs),
whichever `auto` is here.
Every variant's optimizer is the fused AdamW (TRL's default, and the trainer's).
Each variant runs in its own process; the peak RSS is reset after the models load, so
`peak_mem_mb` is the training steps' peak (weights, optimizer state, activations, logits)
and `step_peak_over_base_mb` what the step adds to the loaded models. Also:
- loss_only: the output heads + loss + its gradients alone, from fixed hidden states (B*T, H):
  edgekit's fused loss vs the naive full-logits forward KL + autograd; ms and memory above
  the hidden states;
- profile: where edgekit's step goes (student trunk forward, teacher trunk forward, heads +
  loss with gradients, trunk backward, optimizer), median seconds over the timed steps;
- estimate_mb: what `edgekit validate` predicts for the same settings, beside the measured peak.
TRL's newer DistillationTrainer (chunked loss too) is on-policy only: it generates every
completion, so it does not measure the same step and is not run here.
Writes
benchmarks/results/kd_step.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import rss_mb

REPO = Path(__file__).resolve().parents[1]
PAIRS = {"smollm2": ("embedded:smollm2-135m-instruct", "kd_step.json"),
         "gemma3": ("embedded:gemma3-270m", "kd_step_gemma3.json")}
TOP_K = 64
SAME_MATMULS = "_bf16_matmul"


def step_fn(variant: str, profile: dict):
    import torch

    from edgekit.distill.activations import compact
    from edgekit.distill.losses import forward_kl
    from edgekit.distill.precision import autocast, bf16_heads, matmul_precision
    from edgekit.distill.trainer import KDSettings, chunked_loss, compact_modules, hidden_and_head

    st = KDSettings(temperature=2.0, loss_chunk=128)

    def timed(part, fn):
        t0 = time.perf_counter()
        out = fn()
        profile.setdefault(part, []).append(time.perf_counter() - t0)
        return out

    cpu = torch.device("cpu")

    def edgekit_step(student, teacher, x, cache=None):
        # as the trainer's step runs: its matmul precision, autocast and compact modules
        with matmul_precision(cpu, st.precision), compact(compact_modules(student, cpu, st.precision, False)):
            return edgekit_step_body(student, teacher, x, cache)

    def edgekit_step_body(student, teacher, x, cache=None):
        inputs, labels = x[:, :-1], x[:, 1:].reshape(-1)
        with autocast(cpu, st.precision):
            s_h = timed("student_forward", lambda: hidden_and_head(student)[0](input_ids=inputs)
                        .last_hidden_state.reshape(labels.numel(), -1))
        t_h = None
        if cache is None:
            with torch.no_grad(), autocast(cpu, st.precision):  # as the trainer does
                t_h = timed("teacher_forward", lambda: hidden_and_head(teacher)[0](input_ids=inputs)
                            .last_hidden_state.reshape(labels.numel(), -1))
        s_h, t_h = s_h.float(), t_h.float() if t_h is not None else None  # the head and loss in fp32
        sparse = cache.batch(torch.arange(x.shape[0])) if cache is not None else None
        loss, _ = timed("heads_and_loss", lambda: chunked_loss(s_h, t_h, labels, student, None if cache else teacher,
                                                               st, sparse, head_grad_into_weight=True,
                                                               bf16_heads=bf16_heads(cpu, st.precision)))
        timed("trunk_backward", loss.backward)
        return loss

    def naive_step(student, teacher, x):
        inputs = x[:, :-1]
        s = student(input_ids=inputs).logits  # (B, T, V)
        with torch.no_grad():
            t = teacher(input_ids=inputs).logits  # (B, T, V)
        loss = forward_kl(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), st.temperature).mean()
        loss.backward()
        return loss

    return {"edgekit": edgekit_step, "offline_topk": edgekit_step, "naive": naive_step}[variant]


def loss_only(variant: str, student, teacher, x, repeats: int = 3) -> dict:
    """The heads + loss + gradients from fixed hidden states: median ms, peak memory above them."""
    import torch

    from edgekit.distill.losses import forward_kl
    from edgekit.distill.precision import bf16_heads, matmul_precision
    from edgekit.distill.trainer import KDSettings, chunked_loss, hidden_and_head
    from edgekit.bench.worker import peak_rss_kb

    st = KDSettings(temperature=2.0, loss_chunk=128)
    inputs, labels = x[:, :-1], x[:, 1:].reshape(-1)
    with torch.no_grad():
        s_h0 = hidden_and_head(student)[0](input_ids=inputs).last_hidden_state.reshape(labels.numel(), -1)
        t_h = hidden_and_head(teacher)[0](input_ids=inputs).last_hidden_state.reshape(labels.numel(), -1)
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    times, base = [], rss_mb()
    reset_peak()
    for _ in range(repeats + 1):
        s_h = s_h0.clone().requires_grad_()
        student.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if variant == "edgekit":
            with matmul_precision(torch.device("cpu"), st.precision):
                loss, _ = chunked_loss(s_h, t_h, labels, student, teacher, st, head_grad_into_weight=True,
                                       bf16_heads=bf16_heads(torch.device("cpu"), st.precision))
                loss.backward()
        else:  # naive_bf16: both heads under bf16 autocast (TRL's bf16=True), the loss on fp32 copies
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "naive_bf16"):
                t = t_head(t_h).float()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "naive_bf16"):
                s = s_head(s_h)
            loss = forward_kl(s.float(), t, st.temperature).mean()
            loss.backward()
        times.append(time.perf_counter() - t0)
        del loss
    ms = sorted(times[1:])[len(times[1:]) // 2] * 1000
    return {"ms": round(ms, 1), "mem_mb": round(peak_rss_kb() / 1024 - base, 1)}


def trl_gkd_times(student, teacher, x, steps: int, model: str, bf16: bool = False) -> list[float]:
    """Per-step seconds of TRL's GKDTrainer training `student` on the fixed batch `x` (`bf16`: its
    bf16 autocast, as on GPUs)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from edgekit.models.sources import resolve_model

    times, t0 = [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            t0[0] = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - t0[0])

    def collate(_rows):  # every step trains on the same (B, T+1) rows as the other variants
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    tok = AutoTokenizer.from_pretrained(resolve_model(model, REPO).path)
    args = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=x.shape[0], max_steps=steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", lmbda=0.0, beta=0.0, seq_kd=False,
                     temperature=2.0, use_cpu=True, bf16=bf16, gradient_checkpointing=False, report_to=[], save_strategy="no", logging_strategy="no",
                     remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, max_length=x.shape[1])
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok, data_collator=collate,
                         train_dataset=Dataset.from_dict({"i": list(range(x.shape[0] * steps))}), callbacks=[Timer()])
    reset_peak()  # the trainer is built: from here VmHWM is the training steps' own peak
    trainer.train()
    return times


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def worker(pair: str, variant: str, steps: int, batch: int, seq_len: int) -> None:
    import torch

    from edgekit.bench.worker import peak_rss_kb
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.sources import resolve_model
    from edgekit.models.student import init_from_teacher_layers, layers_to_keep

    if variant.endswith(SAME_MATMULS):  # a baseline given the bf16-multiply fp32 matmuls edgekit's auto uses on AMX
        torch.set_float32_matmul_precision("medium")
        variant = variant.removesuffix(SAME_MATMULS)
    torch.manual_seed(0)
    teacher = load_causal_lm(resolve_model(PAIRS[pair][0], REPO).path)
    student = init_from_teacher_layers(teacher, layers_to_keep(teacher.config.num_hidden_layers, 3, None)).train()
    x = torch.randint(0, teacher.config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    for p in teacher.parameters():  # touch the memory-mapped teacher: its pages count before the steps, as after
        p.data.sum()
    teacher.eval().requires_grad_(False)  # frozen, as the trainer's (autocast caches casts of grad-requiring weights)
    if variant.startswith("loss_"):
        print(json.dumps(loss_only(variant.removeprefix("loss_"), student, teacher, x)))
        return
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)  # the trainer's (distill.lean) and TRL's
    cache = None
    if variant == "offline_topk":
        from edgekit.distill.logit_cache import load_or_build

        cache = load_or_build(teacher, {"benchmark": pair}, x, k=TOP_K, temperature=2.0)
        del teacher
        teacher = None
        from edgekit.fsutil import release_memory

        release_memory()
    base_mb = rss_mb()
    profile = {}
    if variant.startswith("trl_gkd"):
        times = trl_gkd_times(student, teacher, x, steps + 1, PAIRS[pair][0], bf16=variant == "trl_gkd_bf16")
    else:
        fn = step_fn(variant, profile)
        reset_peak()  # from here VmHWM is the training steps' own peak
        times = []
        for i in range(steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if variant == "naive":
                fn(student, teacher, x)
            else:
                fn(student, teacher, x, cache)
            t1 = time.perf_counter()
            opt.step()
            profile.setdefault("optimizer", []).append(time.perf_counter() - t1)
            times.append(time.perf_counter() - t0)
    step_s = median(times[1:])
    peak = peak_rss_kb() / 1024
    out = {"tokens_per_s": batch * seq_len / step_s, "step_s": step_s, "peak_mem_mb": peak,
           "rss_before_steps_mb": base_mb, "step_peak_over_base_mb": peak - base_mb}
    if variant == "edgekit":
        out["profile"] = {k: round(median(v[1:]), 3) for k, v in profile.items()}
    print(json.dumps(out))


def validate_estimate(a) -> tuple[float, int]:
    """What `edgekit validate` predicts (MB) for the benchmark's pair, batch and chunk; the vocabulary."""
    import copy

    import torch

    from edgekit.distill.memory import counts, estimate, model_config
    from edgekit.distill.precision import bf16_heads
    from edgekit.distill.trainer import KDSettings
    from edgekit.models.student import layers_to_keep

    cfg = model_config(PAIRS[a.pair][0], REPO)
    student_cfg = copy.deepcopy(cfg)
    student_cfg.num_hidden_layers = len(layers_to_keep(cfg.num_hidden_layers, 3, None))
    return estimate(counts(cfg), counts(student_cfg), teacher_load=None, optimizer="adamw", batch=a.batch,
                    seq_len=a.seq_len + 1, loss_chunk=128,
                    bf16_heads=bf16_heads(torch.device("cpu"), KDSettings().precision))["total_mb"], cfg.vocab_size


def same_precision_rows() -> str:
    """The baselines given edgekit's `auto` precision on this CPU, beside their fp32 defaults:
    oneDNN's "medium" fp32 matmuls for the naive loss (the heads' kernel in both modes), and TRL
    with the same matmuls (bf16_matmul) or its own bf16 autocast (bf16)."""
    import torch

    from edgekit.distill.precision import resolved_precision

    mode = resolved_precision(torch.device("cpu"), "auto")
    return {"bf16_matmul": ",trl_gkd_bf16_matmul,loss_naive_bf16_matmul",
            "bf16": ",trl_gkd_bf16,loss_naive_bf16_matmul,loss_naive_bf16"}.get(mode, "")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="smollm2")
    ap.add_argument("--variants", help="default: edgekit,naive,trl_gkd,offline_topk,loss_edgekit,loss_naive "
                    "+ the baselines at edgekit's precision on this CPU (same_precision_rows)")
    ap.add_argument("--keep-others", action="store_true",
                    help="re-measure only --variants; keep the results file's other rows (listed in rows_from_the_run_before)")
    ap.add_argument("--worker")
    ap.add_argument("--estimate-only", action="store_true", help="recompute only the results file's estimate_mb")
    a = ap.parse_args()
    if a.worker:
        return worker(a.pair, a.worker, a.steps, a.batch, a.seq_len)
    a.variants = a.variants or "edgekit,naive,trl_gkd,offline_topk,loss_edgekit,loss_naive" + same_precision_rows()
    import torch

    from edgekit.distill.precision import resolved_precision
    from edgekit.machine import machine_description

    if a.estimate_only:  # the estimate beside the committed measurement, after a change to the estimate alone
        result = json.loads((REPO / "benchmarks" / "results" / PAIRS[a.pair][1]).read_text())
        result["estimate_mb"] = validate_estimate(a)[0]
        result["estimate_error"] = round(result["estimate_mb"] / result["edgekit"]["peak_mem_mb"] - 1, 3)
        (REPO / "benchmarks" / "results" / PAIRS[a.pair][1]).write_text(json.dumps(result, indent=2) + "\n")
        return print(result["estimate_mb"], result["estimate_error"])
    result = {}
    if a.keep_others:  # re-measure some rows: the others (and their machine) stay from the committed run
        result = json.loads((REPO / "benchmarks" / "results" / PAIRS[a.pair][1]).read_text())
        result["edgekit"]["profile"] = result.pop("profile")
        rows = [k for k in result if isinstance(result[k], dict) and "tokens_per_s" in result[k]]
        rows += ["loss_" + k for k in result.get("loss_only", {}) if isinstance(result["loss_only"][k], dict)]
        result["rows_from_the_run_before"] = sorted(set(rows) - set(a.variants.split(",")))
    for variant in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--pair", a.pair, "--steps", str(a.steps),
                              "--batch", str(a.batch), "--seq-len", str(a.seq_len)], stdout=subprocess.PIPE, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        if variant.startswith("loss_"):
            result.setdefault("loss_only", {})[variant.removeprefix("loss_")] = row
        else:
            result[variant] = row
        print(variant, row, flush=True)
    import trl

    e = result["edgekit"]
    result["profile"] = e.pop("profile")
    est, vocab = validate_estimate(a)
    result.update({"batch": a.batch, "seq_len": a.seq_len, "vocab": vocab, "trl_version": trl.__version__,
                   "machine": machine_description(), "estimate_mb": est,
                   "estimate_error": round(est / e["peak_mem_mb"] - 1, 3),
                   "speedup_vs_naive": e["tokens_per_s"] / result["naive"]["tokens_per_s"],
                   "memory_ratio_vs_naive": e["peak_mem_mb"] / result["naive"]["peak_mem_mb"],
                   "speedup_vs_trl_gkd": e["tokens_per_s"] / result["trl_gkd"]["tokens_per_s"],
                   "memory_ratio_vs_trl_gkd": e["peak_mem_mb"] / result["trl_gkd"]["peak_mem_mb"],
                   "precision": resolved_precision(torch.device("cpu"), "auto")})
    for same in ("trl_gkd" + SAME_MATMULS, "trl_gkd_bf16"):
        if same in result:
            result["speedup_vs_" + same] = e["tokens_per_s"] / result[same]["tokens_per_s"]
            result["memory_ratio_vs_" + same] = e["peak_mem_mb"] / result[same]["peak_mem_mb"]
    if "loss_only" in result:
        lo = result["loss_only"]
        result["loss_only"]["speedup"] = lo["naive"]["ms"] / lo["edgekit"]["ms"]
        result["loss_only"]["memory_ratio"] = lo["edgekit"]["mem_mb"] / lo["naive"]["mem_mb"]
        for same in (SAME_MATMULS, "_bf16"):
            if "naive" + same in lo:
                lo["speedup_vs_naive" + same] = lo["naive" + same]["ms"] / lo["edgekit"]["ms"]
                lo["memory_ratio_vs_naive" + same] = lo["edgekit"]["mem_mb"] / lo["naive" + same]["mem_mb"]
    (REPO / "benchmarks" / "results" / PAIRS[a.pair][1]).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
