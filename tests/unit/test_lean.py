"""Memory-lean KD: NF4/int8 teachers (bitsandbytes), 8-bit AdamW, LoRA students (peft),
and the memory estimate `edgekit validate` prints."""


import pytest
import torch

from edgekit.cli import main


def test_nf4_and_int8_teachers_stay_close_to_fp32(tiny_teacher_dir):
    from edgekit.models.loading import load_causal_lm

    fp = load_causal_lm(tiny_teacher_dir)
    x = torch.randint(0, fp.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    kl = {}
    with torch.no_grad():
        ref = fp(x).logits.log_softmax(-1)
        uniform = float((ref.exp() * (ref + torch.log(torch.tensor(float(ref.shape[-1]))))).sum(-1).mean())
        for load in ("nf4", "int8", "fp16"):
            q = load_causal_lm(tiny_teacher_dir, load=load)
            assert q.get_memory_footprint() < fp.get_memory_footprint()
            out = q(x).logits.float().log_softmax(-1)
            kl[load] = float((ref.exp() * (ref - out)).sum(-1).mean())
            if load == "nf4":
                assert any("4bit" in type(m.weight).__name__.lower() for m in q.modules() if hasattr(m, "weight"))
    # more bits, closer to fp32; all far closer than knowing nothing (a uniform guess)
    assert 0 < kl["fp16"] < kl["int8"] < kl["nf4"] < uniform / 2, (kl, uniform)


@pytest.mark.parametrize("load", ["fp16", "bf16", "nf4"])
def test_kd_step_runs_with_a_lean_teacher(tiny_teacher_dir, load):
    """The fused loss reads an fp16 or bf16 teacher's head (its dtype's matmul) and an NF4 teacher's
    int8 head, and gives a loss close to the fp32 teacher's."""
    from edgekit.distill.trainer import KDSettings, chunked_loss, hidden_and_head
    from edgekit.models.loading import load_causal_lm
    from edgekit.models.student import init_from_teacher_layers

    fp = load_causal_lm(tiny_teacher_dir)
    student = init_from_teacher_layers(fp, [0])
    x = torch.randint(0, fp.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    labels = x[:, 1:].reshape(-1)
    s_h = hidden_and_head(student)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
    values = {}
    for name, teacher in (("fp32", fp), (load, load_causal_lm(tiny_teacher_dir, load=load))):
        with torch.no_grad():
            t_h = hidden_and_head(teacher)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
        values[name] = float(chunked_loss(s_h, t_h.float(), labels, student, teacher, KDSettings(loss_chunk=8))[0])
    assert values[load] == pytest.approx(values["fp32"], rel=0.1), values


def test_quantized_teacher_keeps_only_int8_embeddings(tiny_teacher_dir):
    """An NF4/int8 teacher's embedding and head become int8 rows (shared when tied): the
    logits stay close to fp32, generation works, and no fp32 (V, H) matrix is left."""
    from edgekit.models.int8_rows import Int8Rows
    from edgekit.models.loading import load_causal_lm

    fp = load_causal_lm(tiny_teacher_dir)
    q = load_causal_lm(tiny_teacher_dir, load="int8")
    emb, head = q.get_input_embeddings(), q.get_output_embeddings()
    assert emb.q.dtype == torch.int8 and head.q.dtype == torch.int8
    vocab = fp.config.vocab_size
    assert not [n for n, p in q.named_parameters() if p.dtype == torch.float32 and p.shape[0] == vocab]
    if fp.config.tie_word_embeddings:
        assert emb.q.data_ptr() == head.q.data_ptr()
    x = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(q.get_input_embeddings()(x), fp.get_input_embeddings()(x), atol=0.02)
        assert q.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 19)
    w = torch.randn(100, 8)
    rows = Int8Rows(w)
    assert (rows.rows(torch.arange(100)) - w).abs().max() <= rows.scale.max() / 2 + 1e-6
    h = torch.randn(3, 8)
    assert torch.allclose(rows.logits(h), h @ rows.rows(torch.arange(100)).T, atol=1e-5)


def test_bad_lora_target_is_named(tiny_recipe, tmp_path, capsys):
    text = tiny_recipe.read_text().replace("warmup_steps: 1}", "warmup_steps: 1, lora: {targets: [qkv]}}")
    tiny_recipe.write_text(text)
    assert main(["run", str(tiny_recipe), "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lora.targets ['qkv']" in err and "q_proj" in err


def test_bad_teacher_load_is_refused(tiny_recipe, capsys):
    tiny_recipe.write_text(tiny_recipe.read_text().replace("teacher: {model: ", "teacher: {load: nf8, model: "))
    assert main(["validate", str(tiny_recipe)]) == 2
    assert "nf8" in capsys.readouterr().err


def test_estimate_grows_and_shrinks_as_it_should(tiny_teacher_dir):
    from transformers import AutoConfig

    from edgekit.distill.memory import ModelCounts, counts, estimate
    from edgekit.models.loading import load_causal_lm

    tiny = counts(AutoConfig.from_pretrained(tiny_teacher_dir))  # from the config alone, on the meta device
    assert tiny.params == sum(p.numel() for p in load_causal_lm(tiny_teacher_dir).parameters())
    c = ModelCounts(params=135_000_000, block_linear=106_000_000, layers=30, hidden=576, intermediate=1536, vocab=49152)
    base = dict(batch=4, seq_len=256, loss_chunk=128)
    full = estimate(c, c, teacher_load=None, optimizer="adamw", **base)
    for half in ("fp16", "bf16"):
        assert estimate(c, c, teacher_load=half, optimizer="adamw", **base)["teacher_weights_mb"] == pytest.approx(
            full["teacher_weights_mb"] / 2, rel=0.01)
    assert estimate(c, c, teacher_load="nf4", optimizer="adamw", **base)["teacher_weights_mb"] < full["teacher_weights_mb"]
    assert estimate(c, c, teacher_load=None, optimizer="adamw8bit", **base)["optimizer_states_mb"] == pytest.approx(
        full["optimizer_states_mb"] / 4, rel=0.05)
    assert estimate(c, c, teacher_load=None, optimizer="adamw", **(base | {"batch": 8}))["activations_mb"] == pytest.approx(
        2 * full["activations_mb"], rel=0.02)


def test_a_half_precision_teacher_dtype_is_estimated_at_two_bytes(tiny_recipe):
    """`dtype: bfloat16` (or float16) without `load` holds the teacher at 2 bytes a weight: the
    estimate counts it so, as it counts `load: bf16`, not at fp32's 4."""
    from edgekit.distill.memory import recipe_estimates
    from edgekit.stages import load_recipe

    text = tiny_recipe.read_text()
    weights = {}
    for name, spec in (("fp32", ""), ("dtype", "dtype: bfloat16, "), ("load", "load: bf16, ")):
        tiny_recipe.write_text(text.replace("teacher: {model: ", "teacher: {" + spec + "model: "))
        recipe, base = load_recipe(tiny_recipe)
        weights[name] = recipe_estimates(recipe, base)[0][1]["teacher_weights_mb"]
    assert weights["dtype"] == weights["load"] < weights["fp32"] * 0.6, weights  # 0.1 MB rounding of a tiny model


def test_real_size_recipe_prints_its_estimate_from_cached_configs(tmp_path):
    """The shipped 1.7B -> 360M recipe: with the two configs in the hub cache (as after a
    first download), validate prints the distill stage's expected peak (~12.2 GB on a CPU: an NF4
    teacher with int8 embeddings holds only its quantized weights; the student's MLPs and norms compact)."""
    import os
    import subprocess
    import sys

    from transformers import LlamaConfig

    from tests.conftest import REPO

    configs = {
        "HuggingFaceTB/SmolLM2-1.7B-Instruct": LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                                                           num_hidden_layers=24, num_attention_heads=32,
                                                           num_key_value_heads=32, tie_word_embeddings=True),
        "HuggingFaceTB/SmolLM2-360M-Instruct": LlamaConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560,
                                                           num_hidden_layers=32, num_attention_heads=15,
                                                           num_key_value_heads=5, tie_word_embeddings=True),
    }
    for repo, cfg in configs.items():  # the hub cache layout huggingface_hub reads offline
        root = tmp_path / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0" * 40)
        snap = root / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True)
        cfg.save_pretrained(snap)
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "edgekit.cli", "validate", "recipes/smollm2-1.7b-to-360m.yaml"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("distill: expected peak memory"))
    total = float(line.split("memory ")[1].split(" MB")[0].replace(",", ""))
    assert 11_500 < total < 13_000, line
