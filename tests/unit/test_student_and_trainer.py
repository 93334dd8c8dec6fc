"""Student init from teacher layers, the KD trainer: learning, exact resume, NaN guard, chunking."""

import pytest
import torch

from edgekit.distill.trainer import KDSettings, chunked_loss, hidden_and_head, train
from edgekit.errors import EdgekitError
from edgekit.models.loading import load_causal_lm
from edgekit.models.student import check_same_vocab, init_from_teacher_layers, layers_to_keep


@pytest.fixture
def teacher(tiny_teacher_dir):
    return load_causal_lm(tiny_teacher_dir)


@pytest.fixture
def rows(tiny_teacher_dir):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 300, (16, 24), generator=g)


def test_layers_to_keep():
    assert layers_to_keep(30, 3, None) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert layers_to_keep(4, 2, None) == [0, 2, 3]
    assert layers_to_keep(4, None, [1, 2]) == [1, 2]
    with pytest.raises(EdgekitError, match="only 4 layers"):
        layers_to_keep(4, None, [1, 7])


def test_block_importance_finds_the_layer_that_does_nothing(teacher):
    """A layer whose attention and MLP outputs are zeroed passes the residual stream through:
    Block Influence ~0, and it is the one dropped."""
    from edgekit.models.student import block_importance, most_important

    rows = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_importance(teacher, rows, batch=4)
    assert len(scores) == 4
    assert abs(scores[2]) < 1e-5 and min(scores[i] for i in (0, 1, 3)) > 1e-3, scores
    assert most_important(scores, 3) == [0, 1, 3]
    assert most_important([0.1, 0.5, 0.3, 0.2], 2) == [1, 2]


def test_narrower_mlps_drop_the_dead_channels_and_export(teacher, tiny_teacher_dir, tmp_path):
    """Minitron width pruning: channels whose activation is always 0 score 0 and are the ones
    dropped, so the half-width model computes exactly what the full one did; it saves with
    its new intermediate size and llama.cpp runs its GGUF with the same logits."""
    from edgekit.bench.llama_runner import llama_scorer
    from edgekit.models.loading import save_model
    from edgekit.export.gguf_write import write_gguf
    from edgekit.models.student import mlp_channel_importance, narrow_mlps, narrow_width

    assert narrow_width(1536, 0.5) == 768 and narrow_width(576, 0.3) == 160 and narrow_width(64, 0.1) == 32
    student = init_from_teacher_layers(teacher, [0, 1, 2, 3])
    width = student.config.intermediate_size
    dead = torch.arange(width) % 2 == 1
    with torch.no_grad():
        for layer in student.model.layers:
            layer.mlp.up_proj.weight[dead] = 0
    rows = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(1))
    scores = mlp_channel_importance(student, rows)
    assert len(scores) == 4 and all(float(s[dead].abs().max()) == 0 and float(s[~dead].min()) > 0 for s in scores)
    with torch.no_grad():
        before = student(input_ids=rows).logits
    info = narrow_mlps(student, 0.5, scores)
    assert info["intermediate_size"] == [width, width // 2] and info["importance_kept_per_layer"] == [1.0] * 4
    assert student.model.layers[0].mlp.down_proj.weight.shape == (student.config.hidden_size, width // 2)
    with torch.no_grad():
        assert torch.allclose(student(input_ids=rows).logits, before, atol=1e-5)
    save_model(student, tiny_teacher_dir, tmp_path / "narrow")
    reloaded = load_causal_lm(tmp_path / "narrow")
    assert reloaded.config.intermediate_size == width // 2
    gguf = write_gguf(tmp_path / "narrow", tmp_path / "narrow-F16.gguf", "f16")
    from_file = llama_scorer(gguf, ctx=16)(rows[0])
    kl = torch.nn.functional.kl_div(from_file.log_softmax(-1), before[0].log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert float(kl.max()) < 1e-3  # F16 weights in the file


def test_student_copies_the_kept_teacher_layers(teacher):
    student = init_from_teacher_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert s["model.layers.1.mlp.up_proj.weight"].data_ptr() != t["model.layers.3.mlp.up_proj.weight"].data_ptr()


def test_vocab_mismatch_is_refused_with_advice(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)

    class Other:
        def get_vocab(self):
            return {"x": 0, "y": 1}

    check_same_vocab(a, a, "t", "s")
    with pytest.raises(EdgekitError, match="different vocabularies.*sequence-level KD"):
        check_same_vocab(a, Other(), "t", "s")


@pytest.mark.parametrize("loss,temperature,alpha_ce", [("forward_kl", 2.0, 0.3), ("forward_kl", 1.0, 0.0),
                                                        ("forward_kl", 2.0, 0.0), ("forward_kl", 3.0, 0.3),
                                                        ("forward_kl", 1.0, 0.6), ("forward_kl", 0.5, 1.0),
                                                        ("jsd", 2.0, 0.3), ("reverse_kl", 2.0, 0.3)])
def test_fused_chunked_loss_equals_plain_autograd(teacher, rows, loss, temperature, alpha_ce):
    """The fused, chunked loss and its gradients equal full-logit autograd (the slow, obvious way):
    forward KL through its closed-form in-place gradient, the other losses through autograd."""
    from edgekit.distill.losses import cross_entropy, kd_loss

    student = init_from_teacher_layers(teacher, [0, 3])
    x = rows[:2]
    labels = x[:, 1:].reshape(-1).clone()
    labels[:5] = -100  # masked positions count in neither loss
    st = KDSettings(loss_chunk=7, alpha_ce=alpha_ce, temperature=temperature, loss=loss)
    trunk_s, trunk_t = hidden_and_head(student)[0], hidden_and_head(teacher)[0]

    def grads(fused: bool):
        student.zero_grad()
        s_h = trunk_s(input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
        with torch.no_grad():
            t_h = trunk_t(input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
        if fused:
            value, _ = chunked_loss(s_h, t_h, labels, student, teacher, st)
        else:
            s_logits, t_logits = student.lm_head(s_h), teacher.lm_head(t_h)
            valid = labels != -100
            kd = (kd_loss(loss, s_logits, t_logits, temperature) * valid).sum()
            value = (alpha_ce * cross_entropy(s_logits, labels).sum() + (1 - alpha_ce) * kd) / valid.sum()
        value.backward()
        return value.detach(), student.model.layers[0].mlp.up_proj.weight.grad.clone(), student.lm_head.weight.grad.clone()

    fused, plain = grads(True), grads(False)
    assert torch.allclose(fused[0], plain[0], rtol=1e-5)
    assert torch.allclose(fused[1], plain[1], rtol=1e-3, atol=1e-6)
    assert torch.allclose(fused[2], plain[2], rtol=1e-3, atol=1e-6)  # tied head + embedding gradient


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_loss_with_a_soft_capped_teacher(teacher, rows, temperature):
    """A teacher whose logits are soft-capped (Gemma 2) is capped before T divides them; the loss,
    its CE part and the head's gradient equal full-logit autograd."""
    import copy

    from edgekit.distill.losses import cross_entropy, kd_loss
    from edgekit.distill.trainer import _softcap

    student = init_from_teacher_layers(teacher, [0, 3])
    capped = copy.deepcopy(teacher)
    capped.config.final_logit_softcapping = 2.0
    x = rows[:2]
    labels = x[:, 1:].reshape(-1)
    st = KDSettings(loss_chunk=6, temperature=temperature)
    s_h = hidden_and_head(student)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
    with torch.no_grad():
        t_h = hidden_and_head(capped)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
    value, parts = chunked_loss(s_h, t_h, labels, student, capped, st)
    (grad,) = torch.autograd.grad(value, student.lm_head.weight, retain_graph=True)
    s_logits, t_logits = student.lm_head(s_h), _softcap(capped.lm_head(t_h), 2.0)
    plain = kd_loss("forward_kl", s_logits, t_logits, temperature).mean()
    (plain_grad,) = torch.autograd.grad(plain, student.lm_head.weight)
    assert float(value) == pytest.approx(plain.item(), rel=1e-5)
    assert parts["ce"] == pytest.approx(float(cross_entropy(s_logits, labels).mean()), rel=1e-5)
    assert torch.allclose(grad, plain_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("temperature,alpha_ce,cap,flush", [(2.0, 0.0, None, 16), (2.0, 0.3, None, 3), (1.0, 0.5, None, 16),
                                                           (3.0, 0.3, None, 16), (2.0, 0.3, 2.0, 16), (1.0, 1.0, "none", 16)])
def test_bf16_heads_stay_near_the_fp32_loss_and_gradients(teacher, rows, temperature, alpha_ce, cap, flush, monkeypatch):
    """bf16_heads (precision: bf16): both heads multiply bf16-rounded inputs, the loss and its
    gradient stay fp32. The loss, the hidden states' and the head's gradients are near fp32's
    (bf16-sized differences, not none), with any temperature and CE share, a soft-capped
    teacher, no teacher ("none"), and more chunks than are summed in bf16 before an fp32 sum
    (8 chunks, FLUSH lowered to 3: two fp32 sums in the loop, one at the end)."""
    import copy

    from edgekit.distill.trainer import Bf16HeadMatmuls

    student = init_from_teacher_layers(teacher, [0, 3])
    t_model = None if cap == "none" else copy.deepcopy(teacher)
    if cap not in (None, "none"):
        t_model.config.final_logit_softcapping = cap
    x = rows[:2, :32]
    labels = x[:, 1:].reshape(-1).clone()
    labels[:3] = -100
    st = KDSettings(loss_chunk=8, alpha_ce=alpha_ce, temperature=temperature)
    monkeypatch.setattr(Bf16HeadMatmuls, "FLUSH", flush)
    s_h0 = hidden_and_head(student)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1).detach()
    t_h = None
    if t_model is not None:
        with torch.no_grad():
            t_h = hidden_and_head(t_model)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)

    def run(bf16: bool):
        student.zero_grad(set_to_none=True)
        s_h = s_h0.clone().requires_grad_()
        value, parts = chunked_loss(s_h, t_h, labels, student, t_model, st, head_grad_into_weight=True, bf16_heads=bf16)
        value.backward()
        return float(value), parts, s_h.grad, student.lm_head.weight.grad.clone()

    ref, bf = run(False), run(True)
    assert bf[0] != ref[0] and bf[0] == pytest.approx(ref[0], rel=2e-3)
    assert bf[1]["ce"] == pytest.approx(ref[1]["ce"], rel=2e-3)
    for a, b in ((ref[2], bf[2]), (ref[3], bf[3])):
        assert float((a - b).norm() / a.norm()) < 0.05
        assert float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)) > 0.998


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_with_a_biased_teacher_head(teacher, rows, bf16):
    """A teacher whose output layer has a bias (Phi-2's does): its logits include the bias, then T
    divides them; the loss equals full-logit autograd (fp32 heads) or is near it (bf16 heads)."""
    import copy

    from edgekit.distill.losses import kd_loss

    student = init_from_teacher_layers(teacher, [0, 3])
    biased = copy.deepcopy(teacher)
    w = biased.lm_head.weight.detach().clone()
    biased.lm_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=True)
    biased.lm_head.weight.data, biased.lm_head.bias.data = w, torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0))
    x = rows[:2]
    labels = x[:, 1:].reshape(-1)
    st = KDSettings(loss_chunk=8, temperature=2.0)
    s_h = hidden_and_head(student)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
    with torch.no_grad():
        t_h = hidden_and_head(biased)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
    value, _ = chunked_loss(s_h, t_h, labels, student, biased, st, bf16_heads=bf16)
    plain = kd_loss("forward_kl", student.lm_head(s_h), biased.lm_head(t_h), 2.0).mean()
    without_bias = kd_loss("forward_kl", student.lm_head(s_h), t_h @ w.T, 2.0).mean()
    assert float(value) == pytest.approx(plain.item(), rel=2e-3 if bf16 else 1e-5)
    assert abs(plain.item() - without_bias.item()) > 0.05 * plain.item()  # the bias matters here


def test_fused_loss_without_teacher_is_cross_entropy_and_scales_in_place(teacher, rows):
    """No teacher: the fused loss is plain CE; a scaled backward (grad_accum) scales its gradients."""
    from edgekit.distill.losses import cross_entropy

    student = init_from_teacher_layers(teacher, [0, 3])
    x = rows[:2]
    labels = x[:, 1:].reshape(-1).clone()
    labels[-3:] = -100
    trunk = hidden_and_head(student)[0]

    def head_grad(fused: bool):
        student.zero_grad()
        s_h = trunk(input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
        if fused:
            value, parts = chunked_loss(s_h, None, labels, student, None, KDSettings(loss_chunk=5))
            assert parts["kd"] == 0.0
        else:
            value = cross_entropy(student.lm_head(s_h), labels).sum() / (labels != -100).sum()
        (value * 0.25).backward()
        return value.detach(), student.lm_head.weight.grad.clone()

    fused, plain = head_grad(True), head_grad(False)
    assert torch.allclose(fused[0], plain[0], rtol=1e-5)
    assert torch.allclose(fused[1], plain[1], rtol=1e-3, atol=1e-7)


def test_loss_chunk_shrinks_with_the_vocabulary():
    from edgekit.distill.memory import loss_chunk_rows

    assert loss_chunk_rows(128, 49_152) == 128
    assert loss_chunk_rows(512, 49_152) == 512
    assert loss_chunk_rows(512, 262_144) == 128
    assert loss_chunk_rows(16, 262_144) == 16
    assert loss_chunk_rows(128, 10_000_000) == 8


def kl_to_teacher(student, teacher, rows):
    from edgekit.bench.quality import evaluate, torch_scorer

    r = evaluate({"s": torch_scorer(student), "t": torch_scorer(teacher)}, rows[:4], [("s", "t")])
    return r["s|t"]["kl"]


def test_kd_lowers_kl_to_teacher(teacher, rows, tmp_path):
    student = init_from_teacher_layers(teacher, [0, 3])
    before = kl_to_teacher(student, teacher, rows)
    train(student, teacher, rows, KDSettings(steps=15, batch_size=4, lr=3e-3, warmup_steps=1, loss_chunk=16), tmp_path)
    after = kl_to_teacher(student, teacher, rows)
    assert after < 0.7 * before


def test_periodic_holdout_evaluation_and_tensorboard(teacher, rows, tmp_path):
    """eval_every: the student is scored on held-out rows during training (the same numbers
    `evaluate` gives for the model at that point), logged to metrics.jsonl and TensorBoard."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_rows, holdout = rows[:12], rows[12:]
    student = init_from_teacher_layers(teacher, [0, 3])
    st = KDSettings(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, loss_chunk=16, eval_every=3)
    last = train(student, teacher, train_rows, st, tmp_path, holdout=holdout)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "holdout" in x and "loss" not in x]
    assert [x["step"] for x in evals] == [3, 6]
    assert evals[1]["holdout"]["kl"] < evals[0]["holdout"]["kl"]
    assert last["holdout"] == evals[1]["holdout"]
    assert evals[1]["holdout"]["kl"] == pytest.approx(kl_to_teacher(student, teacher, holdout), rel=1e-4)
    assert student.training is False  # train() hands back an eval-mode model, as before
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"distill/loss", "distill/holdout/kl", "distill/holdout/ppl"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("distill/holdout/kl")] == [3, 6]


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "skew_forward_kl", "tvd"])
def test_every_loss_trains(teacher, rows, tmp_path, loss):
    student = init_from_teacher_layers(teacher, [0, 3])
    last = train(student, teacher, rows, KDSettings(loss=loss, steps=2, batch_size=2), tmp_path)
    assert last["step"] == 2 and last["loss"] > 0


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_exact(teacher, rows, tmp_path, monkeypatch, optimizer):
    import edgekit.distill.trainer as trainer

    st = KDSettings(steps=4, batch_size=2, checkpoint_every=2, lr=1e-3, warmup_steps=1, optimizer=optimizer)
    straight = init_from_teacher_layers(teacher, [0, 3])
    train(straight, teacher, rows, st, tmp_path / "a")

    real_save = trainer.save_checkpoint

    def save_then_crash(*args):
        real_save(*args)
        raise RuntimeError("simulated crash right after the step-2 checkpoint")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(init_from_teacher_layers(teacher, [0, 3]), teacher, rows, st, tmp_path / "b")
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    resumed = init_from_teacher_layers(teacher, [0, 3])  # a new process: fresh weights, resumed from disk
    train(resumed, teacher, rows, st, tmp_path / "b")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_of_another_student_is_refused_with_the_fix(teacher, rows, tmp_path):
    train(init_from_teacher_layers(teacher, [0, 3]), teacher, rows, KDSettings(steps=2, batch_size=2, checkpoint_every=1),
          tmp_path)
    with pytest.raises(EdgekitError, match="does not fit this model.*delete"):
        train(init_from_teacher_layers(teacher, [0, 1, 3]), teacher, rows,
              KDSettings(steps=3, batch_size=2, checkpoint_every=1), tmp_path)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(teacher, rows, tmp_path):
    student = init_from_teacher_layers(teacher, [0, 3])
    train(student, teacher, rows, KDSettings(steps=2, batch_size=2, checkpoint_every=1), tmp_path)
    with torch.no_grad():
        student.model.norm.weight.fill_(float("nan"))
    with pytest.raises(EdgekitError, match="loss became nan at step 0.*lower the learning rate"):
        train(student, teacher, rows, KDSettings(steps=3, batch_size=2, checkpoint_every=1), tmp_path / "nan")
    assert (tmp_path / "checkpoint" / "state.pt").is_file()
    assert list((tmp_path / "checkpoint" / "weights").glob("*.safetensors"))


def test_mask_limits_training_to_marked_tokens(teacher, rows, tmp_path):
    """With a mask that trains nothing but one position per row, the loss is that position's."""
    student = init_from_teacher_layers(teacher, [0, 3])
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask[:, -1] = True
    last = train(student, teacher, rows, KDSettings(steps=1, batch_size=2, alpha_ce=1.0), tmp_path, mask=mask)
    assert last["ce"] > 0


def test_on_policy_batches_are_student_samples(teacher, rows):
    from edgekit.distill.trainer import on_policy_batch

    student = init_from_teacher_layers(teacher, [0, 3])
    ids, mask = on_policy_batch(student, rows[:2], KDSettings(), seed=0)
    assert ids.shape == rows[:2].shape
    half = rows.shape[1] // 2
    assert torch.equal(ids[:, :half], rows[:2, :half]) and not mask[:, :half].any() and mask[:, half].all()


def test_on_policy_training_runs(teacher, rows, tmp_path):
    student = init_from_teacher_layers(teacher, [0, 3])
    last = train(student, teacher, rows, KDSettings(steps=2, batch_size=2, on_policy_fraction=1.0, loss="jsd"), tmp_path)
    assert last["kd"] > 0


def test_reduced_precisions_train_fp32_tensors_near_fp32s_loss(teacher, rows, tmp_path):
    """precision: bf16 (the GPU default; auto's choice on CPUs with AVX-512 BF16 whose oneDNN
    keeps "medium" fp32 matmuls in fp32, as Zen 4's) runs the trunks under bf16 autocast and the
    fused loss's heads on bf16 operands; bf16_matmul (auto's choice where oneDNN does round them,
    AMX) keeps fp32 tensors and lets matmuls multiply bf16-rounded inputs with fp32 accumulation,
    for the step only. Weights, optimizer state, the loss and its gradient stay fp32 in both. Forced on this CPU: bf16's loss is
    close to fp32's, not equal; bf16_matmul's stays near fp32's. The probe behind auto's choice
    says what a head-sized matmul does here: bf16-sized errors where it rounds, fp32-sized where not."""
    from edgekit.distill.precision import autocast, fp32_matmuls_round_to_bf16, matmul_precision, resolved_precision
    from edgekit.distill.trainer import train_device
    from edgekit.machine import cpu_has_bf16_matmul

    cpu = torch.device("cpu")
    assert train_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    rounds = fp32_matmuls_round_to_bf16()
    auto = resolved_precision(cpu, "auto")
    assert auto == ("fp32" if not cpu_has_bf16_matmul() else "bf16_matmul" if rounds else "bf16")
    assert isinstance(autocast(cpu, "auto"), type(autocast(cpu, "fp32"))) == (auto != "bf16")
    assert resolved_precision(torch.device("cuda"), "auto") == "bf16"
    runs = {}
    for precision in ("fp32", "bf16", "bf16_matmul"):
        student = init_from_teacher_layers(teacher, [0, 3])
        runs[precision] = train(student, teacher, rows, KDSettings(steps=3, batch_size=4, lr=3e-3, warmup_steps=1,
                                                                   loss_chunk=16, precision=precision), tmp_path / precision)
        assert all(p.dtype == torch.float32 for p in student.parameters())
        assert torch.get_float32_matmul_precision() == "highest"  # the step's setting was put back
    assert runs["bf16"]["loss"] != runs["fp32"]["loss"]
    assert runs["bf16"]["loss"] == pytest.approx(runs["fp32"]["loss"], rel=0.05)
    assert runs["bf16_matmul"]["loss"] == pytest.approx(runs["fp32"]["loss"], rel=0.02)
    a, b = torch.randn(128, 640, dtype=torch.float64), torch.randn(640, 2048, dtype=torch.float64)
    with matmul_precision(cpu, "bf16_matmul"):
        err = float((a.float() @ b.float() - a @ b).abs().max())
    bf16_err = float((a.bfloat16().double() @ b.bfloat16().double() - a @ b).abs().max())
    assert (err > bf16_err / 10) == (rounds and cpu_has_bf16_matmul())
