"""Data-parallel KD on 2 CPU processes (torchrun, gloo) reaches the loss of 1 process on
the same global batch."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = '''
import json, sys, torch
from pathlib import Path
from edgekit.distill.parallel import world
from edgekit.distill.trainer import KDSettings, train
from edgekit.models.loading import load_causal_lm
from edgekit.models.student import init_from_teacher_layers

teacher_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
rank, size = world()
torch.manual_seed(0)
teacher = load_causal_lm(teacher_dir)
student = init_from_teacher_layers(teacher, [0, 2])
rows = torch.randint(0, teacher.config.vocab_size, (16, 33), generator=torch.Generator().manual_seed(0))
st = KDSettings(steps=4, batch_size=4, grad_accum=2, loss_chunk=16, lr=1e-3, warmup_steps=1, checkpoint_every=2)
last = train(student, teacher, rows, st, out / "work", desc="kd")
if rank == 0:
    w = sum(float(p.detach().double().sum()) for p in student.parameters())
    (out / "result.json").write_text(json.dumps({"loss": last["loss"], "weights": w, "size": size}))
'''


def run(tmp_path, teacher_dir, nproc: int) -> dict:
    out = tmp_path / f"n{nproc}"
    out.mkdir()
    script = tmp_path / "kd.py"
    script.write_text(SCRIPT)
    cmd = ([sys.executable, str(script)] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(script)])
    proc = subprocess.run([*cmd, str(teacher_dir), str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_two_processes_match_one(tiny_teacher_dir, tmp_path):
    one = run(tmp_path, tiny_teacher_dir, 1)
    two = run(tmp_path, tiny_teacher_dir, 2)
    assert two["size"] == 2
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["weights"] == pytest.approx(one["weights"], rel=1e-5)


def test_batch_must_split_over_processes(tiny_teacher_dir, tmp_path, monkeypatch):
    import torch

    from edgekit.distill import parallel
    from edgekit.distill.trainer import KDSettings, train
    from edgekit.errors import EdgekitError

    monkeypatch.setattr(parallel, "world", lambda: (0, 2))
    monkeypatch.setattr("edgekit.distill.trainer.world", lambda: (0, 2))
    with pytest.raises(EdgekitError, match="does not split over 2 processes"):
        train(torch.nn.Linear(2, 2), None, torch.zeros(4, 8, dtype=torch.long), KDSettings(batch_size=3), tmp_path)
