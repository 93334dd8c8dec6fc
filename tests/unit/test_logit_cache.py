"""Offline KD: the teacher's top-k cached once, reused, and equal to online KD when k covers the vocabulary."""


import pytest
import torch

from edgekit.distill.logit_cache import load_or_build
from edgekit.distill.trainer import KDSettings, chunked_loss, hidden_and_head
from edgekit.models.loading import load_causal_lm


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_full_k_offline_loss_and_gradient_equal_online(tiny_teacher_dir, cache_home):
    teacher = load_causal_lm(tiny_teacher_dir)
    student = load_causal_lm(tiny_teacher_dir)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.manual_seed(0)
    rows = torch.randint(0, teacher.config.vocab_size, (3, 17))
    st = KDSettings(temperature=2.0, alpha_ce=0.25, loss_chunk=8)
    cache = load_or_build(teacher, {"test": 1}, rows, k=teacher.config.vocab_size, temperature=2.0)
    idx = torch.tensor([2, 0])
    x = rows[idx]
    labels = x[:, 1:].reshape(-1)
    trunk_s, trunk_t = hidden_and_head(student)[0], hidden_and_head(teacher)[0]
    results = []
    for offline in (False, True):
        student.zero_grad()
        s_h = trunk_s(input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
        if offline:
            loss, parts = chunked_loss(s_h, None, labels, student, None, st, cache.batch(idx))
        else:
            with torch.no_grad():
                t_h = trunk_t(input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
            loss, parts = chunked_loss(s_h, t_h, labels, student, teacher, st)
        loss.backward()
        results.append((float(loss.detach()), parts, student.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (on, on_parts, on_grad), (off, off_parts, off_grad) = results
    assert off == pytest.approx(on, rel=2e-3)  # fp16 storage of the log-probs
    assert off_parts["ce"] == pytest.approx(on_parts["ce"], rel=1e-6)
    assert float((off_grad - on_grad).norm() / on_grad.norm()) < 5e-3


BUILD = '''
import sys, torch
from pathlib import Path
from edgekit.distill.logit_cache import load_or_build
from edgekit.parallel import world
from edgekit.models.loading import load_causal_lm

rank, size = world()
teacher = load_causal_lm(Path(sys.argv[1]))
rows = torch.randint(0, teacher.config.vocab_size, (7, 17), generator=torch.Generator().manual_seed(0))
cache = load_or_build(teacher, {"test": "parallel"}, rows, k=8, temperature=1.0, batch_size=2)
print("built" if cache.built else "reused", cache.path)
'''


def test_cache_builds_in_parallel_shards_and_merges(tiny_teacher_dir, tmp_path, monkeypatch):
    """Under torchrun each process caches its share of the rows and rank 0 merges: the file
    holds what one process computes, and no part files are left behind."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import REPO

    script = tmp_path / "build.py"
    script.write_text(BUILD)
    files = {}
    for nproc in (1, 2):
        monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / f"cache{nproc}"))
        launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", "2"]
        proc = subprocess.run([*launch, str(script), str(tiny_teacher_dir)], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("built") == nproc
        (folder,) = {p.parent for p in (tmp_path / f"cache{nproc}").rglob("*.safetensors")}
        assert [p.name for p in folder.iterdir() if "part" in p.name] == []
        files[nproc] = load_file(next(folder.glob("*.safetensors")))
    assert torch.equal(files[2]["index"], files[1]["index"])
    assert torch.allclose(files[2]["logprobs"].float(), files[1]["logprobs"].float(), atol=1e-3)
