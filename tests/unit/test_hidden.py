"""Hidden-state distillation: layer map, capture hooks, losses, training with projections, resume."""

import json

import pytest
import torch

from edgekit.distill.hidden import HiddenAlign, auto_layer_map, capture, check_layer_map, position_loss
from edgekit.distill.trainer import KDSettings, train
from edgekit.errors import EdgekitError
from edgekit.models.loading import load_causal_lm
from edgekit.models.student import init_from_teacher_layers
from edgekit.recipe.schema import HiddenStateKD
from tests.conftest import make_tiny_llama


@pytest.fixture
def teacher(tiny_teacher_dir):
    return load_causal_lm(tiny_teacher_dir)


@pytest.fixture
def rows():
    return torch.randint(0, 300, (16, 24), generator=torch.Generator().manual_seed(0))


def test_auto_layer_map():
    assert auto_layer_map(3, 30, [0, 14, 29]) == {0: 0, 1: 14, 2: 29}
    assert auto_layer_map(2, 4, None) == {0: 1, 1: 3}  # same relative depth, last to last
    assert auto_layer_map(3, 30, None) == {0: 9, 1: 19, 2: 29}
    with pytest.raises(EdgekitError, match="outside the models: 2->1.*student has layers 0..1"):
        check_layer_map({0: 0, 2: 1}, 2, 4)


def test_capture_records_each_layer_output(teacher):
    """The hooked outputs are the residual stream after each layer (HF's hidden_states[i + 1])."""
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad(), capture(teacher, [0, 2], detach=True) as states:
        ref = teacher(input_ids=x, output_hidden_states=True).hidden_states
    assert sorted(states) == [0, 2]
    assert torch.allclose(states[0], ref[1]) and torch.allclose(states[2], ref[3])
    with torch.no_grad():  # hooks are gone after the block
        teacher(input_ids=x)
    assert sorted(states) == [0, 2]


def test_position_losses():
    t = torch.randn(5, 8)
    for kind in ("cosine", "mse"):
        assert torch.allclose(position_loss(kind, t.clone(), t), torch.zeros(5), atol=1e-6)
    assert torch.allclose(position_loss("cosine", 3 * t, t), torch.zeros(5), atol=1e-6)  # scale-free
    assert torch.allclose(position_loss("cosine", -t, t), torch.full((5,), 2.0), atol=1e-6)
    assert torch.allclose(position_loss("mse", 2 * t, t), torch.ones(5), atol=1e-6)  # relative to |h_t|^2
    assert torch.allclose(position_loss("mse", torch.zeros(5, 8), t), torch.ones(5), atol=1e-6)


def test_hidden_loss_skips_untrained_positions(teacher):
    align = HiddenAlign({0: 0}, 64, 64, "mse", 1.0, seed=0)
    s = {0: torch.randn(1, 4, 64)}
    t = {0: s[0].clone()}
    t[0][0, 3] += 5.0  # differs only where nothing is trained
    assert float(align.loss(s, t, torch.tensor([True, True, True, False]))) == pytest.approx(0.0, abs=1e-7)
    assert float(align.loss(s, t, torch.zeros(4, dtype=torch.bool))) == 0.0  # no trained position: no NaN


def _hidden_distance(align, student, teacher, x):
    with torch.no_grad(), capture(student, list(align.layer_map), True) as s, \
            capture(teacher, list(align.layer_map.values()), True) as t:
        student(input_ids=x)
        teacher(input_ids=x)
    return float(align.loss(s, t, torch.ones(x.numel(), dtype=torch.bool)))


def test_hidden_state_kd_pulls_the_mapped_layers_toward_the_teacher(teacher, tmp_path):
    """Same student, rows, steps and seed, with and without the hidden-state term: with it,
    the mapped layers end closer to the teacher's on the rows trained on."""
    cfg = HiddenStateKD(weight=5.0, loss="cosine")
    st = KDSettings(steps=20, batch_size=4, lr=3e-3, warmup_steps=1)
    rows = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(9))
    distances = {}
    for use in (False, True):
        student = init_from_teacher_layers(teacher, [0, 3])
        align = HiddenAlign.build(cfg, student, teacher, [0, 3], seed=0)
        assert align.layer_map == {0: 0, 1: 3} and len(align.projections) == 0  # same width: no projection
        distances["start"] = _hidden_distance(align, student, teacher, rows)
        train(student, teacher, rows, st, tmp_path / str(use), hidden=align if use else None)
        distances[use] = _hidden_distance(align, student, teacher, rows)
    log = [json.loads(line) for line in (tmp_path / "True" / "metrics.jsonl").read_text().splitlines()]
    assert all("hidden" in r for r in log)
    assert distances[True] < 0.7 * min(distances[False], distances["start"]), distances


def test_narrower_student_learns_a_projection_and_resumes_exactly(teacher, rows, tmp_path, tiny_tokenizer_dir,
                                                                  monkeypatch):
    import edgekit.distill.trainer as trainer

    narrow_dir = make_tiny_llama(tmp_path / "narrow", tiny_tokenizer_dir, layers=2, seed=3, hidden=32)
    cfg = HiddenStateKD(loss="mse", weight=0.5)
    st = KDSettings(steps=4, batch_size=2, checkpoint_every=2, lr=1e-3, warmup_steps=1)

    def fresh():
        s = load_causal_lm(narrow_dir)
        return s, HiddenAlign.build(cfg, s, teacher, None, seed=0)

    straight, a_straight = fresh()
    assert a_straight.layer_map == {0: 1, 1: 3}
    assert set(a_straight.projections) == {"0", "1"}
    before = a_straight.projections["0"].weight.detach().clone()
    train(straight, teacher, rows, st, tmp_path / "a", hidden=a_straight)
    assert not torch.equal(before, a_straight.projections["0"].weight)  # the projection is trained

    real_save = trainer.save_checkpoint

    def save_then_crash(*args):
        real_save(*args)
        raise RuntimeError("simulated crash right after the step-2 checkpoint")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    crashed, a_crashed = fresh()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, teacher, rows, st, tmp_path / "b", hidden=a_crashed)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    resumed, a_resumed = fresh()  # a new process: fresh weights and projections, resumed from disk
    train(resumed, teacher, rows, st, tmp_path / "b", hidden=a_resumed)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(a_straight.state_dict().items(), a_resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_hidden_states_need_the_teacher_online(teacher, rows, tmp_path):
    student = init_from_teacher_layers(teacher, [0, 3])
    align = HiddenAlign({0: 0}, 64, 64, "cosine", 1.0, seed=0)
    with pytest.raises(EdgekitError, match="needs the teacher online"):
        train(student, None, rows, KDSettings(steps=1, batch_size=2), tmp_path, hidden=align)


