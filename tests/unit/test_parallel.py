"""Data-parallel KD on 2 CPU processes (torchrun, gloo) reaches the loss of 1 process on
the same global batch, with replicated or FSDP-sharded models, and checkpoints move
between process counts and layouts."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = '''
import json, sys, torch
from pathlib import Path
from edgekit.parallel import world
from edgekit.distill.trainer import KDSettings, train
from edgekit.models.loading import load_causal_lm
from edgekit.models.student import init_from_teacher_layers

teacher_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
rank, size = world()
torch.manual_seed(0)
teacher = load_causal_lm(teacher_dir)
student = init_from_teacher_layers(teacher, [0, 2])
rows = torch.randint(0, teacher.config.vocab_size, (16, 33), generator=torch.Generator().manual_seed(0))
# fp32: the processes' results agree up to summation order; under bf16 autocast (auto's choice on a
# Zen 4) a different order flips some bf16 roundings, a difference far above these tests' tolerances
st = KDSettings(steps=4, batch_size=4, grad_accum=2, loss_chunk=16, lr=1e-3, warmup_steps=1, checkpoint_every=2,
                **({"precision": "fp32"} | extra))
last = train(student, teacher, rows, st, out / "work", desc="kd")
w = sum(float((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().sum()) for p in student.parameters())
local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in student.parameters())
if rank == 0:
    (out / "result.json").write_text(json.dumps({"loss": last["loss"], "weights": w, "size": size, "local_params": local}))
'''


def run(tmp_path, teacher_dir, nproc: int, extra: dict | None = None, name: str | None = None) -> dict:
    out = tmp_path / (name or f"n{nproc}")
    out.mkdir()
    script = tmp_path / "kd.py"
    script.write_text(SCRIPT)
    cmd = ([sys.executable, str(script)] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(script)])
    proc = subprocess.run([*cmd, str(teacher_dir), str(out), json.dumps(extra or {})], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_two_processes_match_one(tiny_teacher_dir, tmp_path):
    one = run(tmp_path, tiny_teacher_dir, 1)
    two = run(tmp_path, tiny_teacher_dir, 2)
    assert two["size"] == 2
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["weights"] == pytest.approx(one["weights"], rel=1e-5)


SHARDED = {"parallel": {"student": "sharded", "teacher": "sharded"}}


def test_fsdp_sharded_student_and_teacher_match_one_process(tiny_teacher_dir, tmp_path):
    """FSDP2 over 2 processes: each holds about half the student, and training reaches the
    single-process loss and weights. On-policy steps (each process samples its rows from the
    student) give the same result sharded as replicated."""
    one = run(tmp_path, tiny_teacher_dir, 1)
    two = run(tmp_path, tiny_teacher_dir, 2, SHARDED, name="sharded")
    assert two["local_params"] < 0.6 * one["local_params"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["weights"] == pytest.approx(one["weights"], rel=1e-5)
    on_policy = {"on_policy_fraction": 0.5}
    replicated = run(tmp_path, tiny_teacher_dir, 2, on_policy, name="op-replicated")
    sharded = run(tmp_path, tiny_teacher_dir, 2, {**SHARDED, **on_policy}, name="op-sharded")
    assert sharded["loss"] == pytest.approx(replicated["loss"], rel=1e-4)
    assert sharded["weights"] == pytest.approx(replicated["weights"], rel=1e-5)


def test_batch_must_split_over_processes(tiny_teacher_dir, tmp_path, monkeypatch):
    import torch

    from edgekit import parallel
    from edgekit.distill.trainer import KDSettings, train
    from edgekit.errors import EdgekitError

    monkeypatch.setattr(parallel, "world", lambda: (0, 2))
    monkeypatch.setattr("edgekit.distill.trainer.world", lambda: (0, 2))
    with pytest.raises(EdgekitError, match="does not split over 2 processes"):
        train(torch.nn.Linear(2, 2), None, torch.zeros(4, 8, dtype=torch.long), KDSettings(batch_size=3), tmp_path)


def test_resume_on_another_number_of_processes(tiny_teacher_dir, tmp_path):
    """2 steps on 1 process (checkpoint), then the rest on 2 processes = 4 steps on 1 process."""
    straight = run(tmp_path, tiny_teacher_dir, 1)
    script = tmp_path / "kd.py"
    half = tmp_path / "half"
    half.mkdir()
    # 2 of 4 steps, keeping the step-2 checkpoint (a finished run would not need one)
    stop_after_checkpoint = (
        "import edgekit.distill.trainer as tr\n"
        "real = tr.save_checkpoint\n"
        "def save_then_stop(*a):\n"
        "    real(*a)\n"
        "    raise SystemExit(0)\n"
        "tr.save_checkpoint = save_then_stop\n")
    (tmp_path / "kd_half.py").write_text(SCRIPT.replace("last = train(", stop_after_checkpoint + "last = train("))
    subprocess.run([sys.executable, str(tmp_path / "kd_half.py"), str(tiny_teacher_dir), str(half)], cwd=REPO,
                   check=True, capture_output=True, timeout=600)
    assert (half / "work" / "checkpoint" / "state.pt").is_file()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tiny_teacher_dir), str(half)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((half / "result.json").read_text())
    assert resumed["size"] == 2
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-4)
    assert resumed["weights"] == pytest.approx(straight["weights"], rel=1e-5)


def test_sharded_checkpoint_resumes_on_one_process(tiny_teacher_dir, tmp_path):
    """2 FSDP-sharded processes run 2 steps and checkpoint; 1 unsharded process finishes:
    the same as 4 steps on 1 process (one full state, keyed by name, whatever the layout)."""
    straight = run(tmp_path, tiny_teacher_dir, 1)
    half = tmp_path / "half"
    half.mkdir()
    stop = ("import edgekit.distill.trainer as tr\n"
            "real = tr.save_checkpoint\n"
            "def save_then_stop(*a):\n"
            "    real(*a)\n"
            "    raise SystemExit(0)\n"
            "tr.save_checkpoint = save_then_stop\n")
    (tmp_path / "kd_half.py").write_text(SCRIPT.replace("last = train(", stop + "last = train("))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "kd_half.py"), str(tiny_teacher_dir), str(half), json.dumps(SHARDED)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each process wrote its own shards (files shard-0000R-...), neither process the whole student
    from safetensors import safe_open

    numels = {}
    for f in (half / "work" / "checkpoint" / "weights").glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            rank = f.name.split("-")[1]
            numels[rank] = numels.get(rank, 0) + sum(math.prod(s.get_slice(k).get_shape()) for k in s.keys()
                                                     if k.startswith("model/"))
    assert sorted(numels) == ["00001", "00002"]
    assert all(0.3 < n / sum(numels.values()) < 0.7 for n in numels.values()), numels
    (tmp_path / "kd.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "kd.py"), str(tiny_teacher_dir), str(half)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((half / "result.json").read_text())
    assert resumed["size"] == 1
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-4)
    assert resumed["weights"] == pytest.approx(straight["weights"], rel=1e-5)


FREED = '''
import json, sys, torch
from edgekit.parallel import return_freed_host_memory

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

applied = return_freed_host_memory() if sys.argv[1] == "set" else False
big = torch.ones(4 << 20)  # 16 MiB, its own mapping; freeing it raises glibc's adaptive threshold
del big
blocks, kept = [], []
for _ in range(32):  # as FSDP's backward: a 2 MiB gather buffer, freed later, then a gradient shard, kept
    blocks.append(torch.ones(512 << 10))
    kept.append(torch.ones(16 << 10))
before = rss_mb()
del blocks
print(json.dumps({"applied": applied, "returned_mb": before - rss_mb()}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_sharded_cpu_runs_return_freed_blocks(tmp_path, monkeypatch):
    """With glibc's default thresholds, 2 MiB blocks freed after a bigger one come from its heap
    and stay resident; return_freed_host_memory gives them back. A user's own setting wins."""
    script = tmp_path / "freed.py"
    script.write_text(FREED)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)

    def measure(mode: str, env: dict | None = None) -> dict:
        proc = subprocess.run([sys.executable, str(script), mode], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    default, lean = measure("default"), measure("set")
    assert lean["applied"]
    assert lean["returned_mb"] > 60  # 64 MiB freed, given back
    assert default["returned_mb"] < 8  # kept by glibc
    users = measure("set", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "33554432"})
    assert not users["applied"]
