"""Data-parallel KD under torchrun on this machine: one process vs 2 processes with the
models replicated vs sharded by FSDP2 (student and teacher), quickstart pair.

    .venv/bin/python benchmarks/parallel_kd.py [--steps 6] [--batch 4] [--seq-len 128]

Each configuration runs edgekit's trainer (`train`) in fresh processes (gloo backend, one
thread per process under torchrun) on the same global batches:
- peak_mem_mb per process: peak RSS from just before training (models loaded, not yet
  sharded) to the end, beside `edgekit validate`'s per-process estimate for the same settings;
- loading_peak_mb per process: peak RSS of the process up to that point (loading the models);
- "rank 1 from skeletons": as `edgekit run` does when both models are sharded, rank 1 builds
  them on the meta device (no memory) and receives rank 0's values into its shards;
- sharded CPU runs give allocations of 1 MiB and more back to the system when freed
  (parallel.return_freed_host_memory); the last configuration runs without that, with
  glibc's default (adaptive) malloc thresholds;
- tokens_per_s: global tokens per second, median over the steps after the first;
- final_loss: the last step's loss (the same batches, so the three should agree);
- params_mb_per_process: bytes of student + teacher parameters each process holds;
- checkpoint_mb_per_process: what each process wrote into the step-(steps/2) checkpoint
  (torch.distributed.checkpoint: its shards, or its share of the replicated tensors).
  peak_mem_mb includes that save.
On a 2-core CPU this measures memory per process and correctness, not a speed-up: two
processes share the same two cores. Writes benchmarks/results/parallel_kd.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {"1 process": (1, "replicated"), "2 processes, replicated": (2, "replicated"),
           "2 processes, FSDP2 sharded": (2, "sharded"),
           "2 processes, FSDP2 sharded, rank 1 from skeletons": (2, "skeletons"),
           "the same, glibc's default malloc thresholds": (2, "skeletons-glibc")}


def worker(mode: str, steps: int, batch: int, seq_len: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from edgekit.bench.worker import peak_rss_kb
    from edgekit.distill.memory import counts, estimate
    from edgekit.distill.precision import bf16_heads
    from edgekit.parallel import skeleton, world
    from edgekit.distill.trainer import KDSettings, train
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.student import init_from_teacher_layers, layers_to_keep
    from lean_kd import data

    rank, size = world()
    sharded = mode != "replicated"
    torch.manual_seed(0)
    path, rows, _ = data(seq_len)
    if mode == "skeletons-glibc":  # without edgekit's malloc setting for sharded CPU runs
        import edgekit.distill.trainer

        edgekit.distill.trainer.return_freed_host_memory = lambda: False
    if mode.startswith("skeletons"):  # as `edgekit run` does with both models sharded: rank 1 loads nothing
        teacher = skeleton(load_causal_lm(path) if rank == 0 else None, size)
        student = skeleton(init_from_teacher_layers(teacher, layers_to_keep(teacher.config.num_hidden_layers, 3, None))
                           if rank == 0 else None, size)
    else:
        teacher = load_causal_lm(path)
        student = init_from_teacher_layers(teacher, layers_to_keep(teacher.config.num_hidden_layers, 3, None))
    loading_peak_kb = peak_rss_kb()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here: training only
    st = KDSettings(steps=steps, batch_size=batch, lr=1e-4, warmup_steps=1, checkpoint_every=max(1, steps // 2), loss_chunk=128,
                    parallel={"student": "sharded", "teacher": "sharded"} if sharded else {})
    est = estimate(counts(teacher.config), counts(student.config), teacher_load=None, optimizer="adamw", batch=batch,
                   seq_len=seq_len, loss_chunk=128, processes=size, shard_student=sharded, shard_teacher=sharded,
                   bf16_heads=bf16_heads(torch.device("cpu"), st.precision))
    work = Path(tempfile.mkdtemp())
    last = train(student, teacher, rows, st, work)
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
               for p in list(student.parameters()) + list(teacher.parameters()))
    mine = {"rank": rank, "peak_mem_mb": peak_rss_kb() / 1024, "params_mb": held / 2**20,
            "loading_peak_mb": loading_peak_kb / 1024}
    every = [None] * size
    if size > 1:
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    if rank == 0:
        lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
        tps = sorted(x["tokens_per_s"] for x in lines[1:])
        out.write_text(json.dumps({"processes": size, "sharded": sharded, "final_loss": last["loss"],
                                   "tokens_per_s": tps[len(tps) // 2],
                                   "peak_mem_mb_per_process": [round(e["peak_mem_mb"]) for e in every],
                                   "params_mb_per_process": [round(e["params_mb"]) for e in every],
                                   "loading_peak_mb_per_process": [round(e["loading_peak_mb"]) for e in every],
                                   "estimate_mb_per_process": est["total_mb"],
                                   "checkpoint_mb_per_process": checkpoint_mb(work / "checkpoint" / "weights")}))


def checkpoint_mb(folder: Path) -> list[float]:
    """MB each process wrote into a checkpoint (its files are shard-0000R-...)."""
    per_rank: dict[str, int] = {}
    for f in folder.glob("*.safetensors"):
        per_rank[f.name.split("-")[1]] = per_rank.get(f.name.split("-")[1], 0) + f.stat().st_size
    return [round(per_rank[r] / 2**20, 1) for r in sorted(per_rank)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--worker")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.batch, a.seq_len, Path(a.out))
    from edgekit.machine import machine_description

    result = {"pair": "SmolLM2-135M-Instruct -> its 11-layer student", "steps": a.steps, "batch": a.batch,
              "note": ("Processes load both models whole and then shard them (FSDP2), except in the skeleton configurations, "
                       "which are what `edgekit run` does with both models sharded: rank 1 builds them on the meta device and "
                       "receives rank 0's values into its shards (loading peak 486 vs 1341 MB here). The teacher's weights are "
                       "memory-mapped from its safetensors file, so on rank 0 file-backed pages the kernel can reclaim count in "
                       "RSS. Host memory of sharded CPU runs: FSDP gathers each layer into a buffer it frees after the layer's "
                       "use, and gradient shards are made between those; with glibc's default adaptive thresholds such blocks "
                       "(below 32 MiB) come from its heap and what is freed stays resident, fragmented (last configuration: "
                       "3219/3163 MB). edgekit's sharded CPU runs therefore give allocations of 1 MiB and more their own "
                       "mappings, returned when freed (mallopt M_MMAP_THRESHOLD): 2303/1881 MB, at ~20% lower speed from the "
                       "page faults of fresh mappings; a 64 KiB threshold measured 2152/1733 MB at ~27% lower speed. "
                       "Checkpoints: each process writes its own files (student weights + AdamW state, nothing gathered), one "
                       "per decoder layer and one for the rest, because DCP's safetensors writer builds a file in memory before "
                       "writing it; 1 process: peak 2758 MB with no checkpoint, 3774 MB with one file for the whole state, 3148 "
                       "and 3181 MB with the per-layer files (two runs, session 9). On 2 cores two processes share the cores: "
                       "speeds compare layouts' overheads, not a scale-out."),
              "seq_len": a.seq_len, "machine": machine_description(), "configs": {}}
    for name, (nproc, mode) in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            args = [__file__, "--worker", mode, "--steps", str(a.steps), "--batch",
                    str(a.batch), "--seq-len", str(a.seq_len), "--out", str(out)]
            launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc-per-node", str(nproc)]
            subprocess.run([*launch, *args], check=True, cwd=REPO / "benchmarks")
            result["configs"][name] = json.loads(out.read_text())
            print(name, result["configs"][name], flush=True)
    (REPO / "benchmarks" / "results" / "parallel_kd.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
