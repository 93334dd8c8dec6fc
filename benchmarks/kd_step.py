"""KD training-step throughput and peak memory: edgekit's chunked step vs a naive one.

    .venv/bin/python benchmarks/kd_step.py [--steps 4] [--batch 4] [--seq-len 256]

Same pair as the quickstart (SmolLM2-135M teacher, its 11-layer student), same batch.
- edgekit: hidden states from both trunks, loss and its gradient over position chunks
  fused with the output projection (edgekit.distill.trainer.chunked_loss);
- naive: both models' full (B, T, V) logits materialised, forward KL on all of them,
  as a straightforward implementation does;
- trl_gkd: TRL's GKDTrainer (trl.experimental.gkd, TRL 1.16) in its offline setting
  (lmbda=0: no student generation, seq_kd off; beta=0: forward KL), same models, rows,
  batch, temperature and AdamW, driven by its own Trainer loop (`pip install -e .[bench]` installs TRL).
  TRL's SFT-family defaults bf16 autocast and gradient checkpointing are turned off, so all
  three variants compute in fp32 without recomputation (bf16 is ~25x slower on this CPU).
Each variant runs in its own process; the peak RSS is reset after the models load, so
`peak_mem_mb` is the training steps' peak (weights, optimizer state, activations, logits).
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

REPO = Path(__file__).resolve().parents[1]


def step_fn(variant: str):
    import torch

    from edgekit.distill.losses import forward_kl
    from edgekit.distill.trainer import KDSettings, chunked_loss, hidden_and_head

    st = KDSettings(temperature=2.0, loss_chunk=128)

    def edgekit_step(student, teacher, x):
        inputs, labels = x[:, :-1], x[:, 1:].reshape(-1)
        s_h = hidden_and_head(student)[0](input_ids=inputs).last_hidden_state.reshape(labels.numel(), -1)
        with torch.no_grad():
            t_h = hidden_and_head(teacher)[0](input_ids=inputs).last_hidden_state.reshape(labels.numel(), -1)
        loss, _ = chunked_loss(s_h, t_h, labels, student, teacher, st)
        loss.backward()
        return loss

    def naive_step(student, teacher, x):
        inputs = x[:, :-1]
        s = student(input_ids=inputs).logits  # (B, T, V)
        with torch.no_grad():
            t = teacher(input_ids=inputs).logits  # (B, T, V)
        loss = forward_kl(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), st.temperature).mean()
        loss.backward()
        return loss

    return {"edgekit": edgekit_step, "naive": naive_step}[variant]


def trl_gkd_times(student, teacher, x, steps: int) -> list[float]:
    """Per-step seconds of TRL's GKDTrainer training `student` on the fixed batch `x`."""
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

    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct", REPO).path)
    args = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=x.shape[0], max_steps=steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", lmbda=0.0, beta=0.0, seq_kd=False,
                     temperature=2.0, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", logging_strategy="no",
                     remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, max_length=x.shape[1])
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok, data_collator=collate,
                         train_dataset=Dataset.from_dict({"i": list(range(x.shape[0] * steps))}), callbacks=[Timer()])
    reset_peak()  # the trainer is built: from here VmHWM is the training steps' own peak
    trainer.train()
    return times


def worker(variant: str, steps: int, batch: int, seq_len: int) -> None:
    import torch

    from edgekit.bench.worker import peak_rss_kb
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.sources import resolve_model
    from edgekit.models.student import init_from_teacher_layers, layers_to_keep

    torch.manual_seed(0)
    teacher = load_causal_lm(resolve_model("embedded:smollm2-135m-instruct", REPO).path)
    student = init_from_teacher_layers(teacher, layers_to_keep(teacher.config.num_hidden_layers, 3, None)).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x = torch.randint(0, teacher.config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    base_mb = rss_mb()
    if variant == "trl_gkd":
        times = trl_gkd_times(student, teacher, x, steps + 1)
    else:
        fn = step_fn(variant)
        reset_peak()  # from here VmHWM is the training steps' own peak
        times = []
        for i in range(steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            fn(student, teacher, x)
            opt.step()
            times.append(time.perf_counter() - t0)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    peak = peak_rss_kb() / 1024
    print(json.dumps({"tokens_per_s": batch * seq_len / step_s, "step_s": step_s, "peak_mem_mb": peak,
                      "rss_before_steps_mb": base_mb, "step_peak_over_base_mb": peak - base_mb}))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.batch, a.seq_len)
    from edgekit.machine import machine_description

    result = {}
    for variant in ("edgekit", "naive", "trl_gkd"):
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(a.steps), "--batch",
                              str(a.batch), "--seq-len", str(a.seq_len)], capture_output=True, text=True, check=True)
        result[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(variant, result[variant], flush=True)
    import trl

    e = result["edgekit"]
    result.update({"batch": a.batch, "seq_len": a.seq_len, "vocab": 49152, "trl_version": trl.__version__,
                   "machine": machine_description(),
                   "speedup_vs_naive": e["tokens_per_s"] / result["naive"]["tokens_per_s"],
                   "memory_ratio_vs_naive": e["peak_mem_mb"] / result["naive"]["peak_mem_mb"],
                   "speedup_vs_trl_gkd": e["tokens_per_s"] / result["trl_gkd"]["tokens_per_s"],
                   "memory_ratio_vs_trl_gkd": e["peak_mem_mb"] / result["trl_gkd"]["peak_mem_mb"]})
    (REPO / "benchmarks" / "results" / "kd_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
