"""The student's gated MLPs and RMSNorms save fewer activations and train exactly as plain autograd does."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from edgekit.distill.activations import _GatedMLP, _RMSNorm, compact, compact_forwards


def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":  # SiLU
        return LlamaForCausalLM(LlamaConfig(**common))
    return Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=8))  # GELU-tanh


def saved_bytes_and_grads(model, x, compact_: bool):
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.requires_grad or t.grad_fn is not None else 0)
        return t

    forwards = compact_forwards(model) if compact_ else []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), compact(forwards):
        loss = model(input_ids=x).logits.square().mean()
    loss.backward()
    return loss.detach(), sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_compact_forwards_train_as_autograd_with_fewer_saved_tensors(kind):
    model = tiny(kind).train()
    if kind == "gemma3":  # Gemma's norms scale by 1 + weight (zeros when new): make both variants differ
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                torch.nn.init.normal_(m.weight, std=0.3)
    x = torch.randint(0, 96, (2, 12))
    forwards = compact_forwards(model)
    norms_per_layer = 4 if kind == "gemma3" else 2  # + q/k norms on Gemma 3
    kinds = [f.func.__name__ for _, f in forwards]
    assert kinds.count("_mlp_forward") == 2
    assert kinds.count("_norm_forward") == 2 * norms_per_layer + 1 + (4 if kind == "gemma3" else 0)
    assert [f.args[1] for _, f in forwards if f.func.__name__ == "_norm_forward"][0] == (1.0 if kind == "gemma3" else 0.0)
    loss, plain_saved, plain = saved_bytes_and_grads(model, x, compact_=False)
    c_loss, compact_saved, compact = saved_bytes_and_grads(model, x, compact_=True)
    assert torch.allclose(loss, c_loss, rtol=1e-6)
    for name, g in plain.items():
        assert torch.allclose(compact[name], g, rtol=1e-4, atol=1e-7), name
    tokens_x_intermediate, tokens_x_hidden = 2 * 12 * 80 * 4, 2 * 12 * 32 * 4  # one fp32 tensor, bytes
    # two per MLP, two layers; one per norm that sees the hidden width
    assert plain_saved - compact_saved >= 2 * 2 * tokens_x_intermediate + (2 * norms_per_layer + 1) * tokens_x_hidden
    assert "forward" not in model.model.layers[0].mlp.__dict__  # restored on exit


def test_hooked_modules_and_unknown_norms_are_left_alone():
    model = tiny("llama")
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: None)
    norm = model.model.layers[1].input_layernorm

    class OddRMSNorm(type(norm)):  # not an RMSNorm's arithmetic
        def forward(self, x):
            return super().forward(x) * 2

    norm.__class__ = OddRMSNorm
    replaced = [m for m, _ in compact_forwards(model)]
    assert model.model.layers[1].mlp in replaced and model.model.layers[0].mlp not in replaced
    assert model.model.layers[0].input_layernorm in replaced and model.model.layers[1].input_layernorm not in replaced


def test_compact_functions_match_autograd_in_double_precision():
    from torch.autograd import gradcheck

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 6, dtype=torch.double, generator=g, requires_grad=True), torch.randn(6, dtype=torch.double, requires_grad=True)
    assert gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6, 1.0), (x, w))
    wg, wu, wd = (torch.randn(*shape, dtype=torch.double, generator=g, requires_grad=True) for shape in ((8, 6), (8, 6), (6, 8)))
    assert gradcheck(lambda *a: _GatedMLP.apply(*a, torch.nn.functional.silu), (x, wg, wu, wd))


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_embedding_adds_sparse_rows_into_the_head_gradient_the_fused_loss_wrote(tied):
    """Two micro-batches through the trainer's step (compact forwards, fused loss): the same
    gradients as plain autograd, .grad dense (the fused AdamW takes no sparse one), and with a
    tied embedding nothing dense reaches autograd for the shared weight: the head's gradient
    went into .grad directly and the embedding's rows came sparse, so no second (V, H) tensor."""
    from edgekit.distill.trainer import KDSettings, chunked_loss, hidden_and_head

    teacher = tiny("gemma3").eval()
    torch.manual_seed(1)
    student = tiny("gemma3").train()
    if not tied:
        student.lm_head.weight = torch.nn.Parameter(student.lm_head.weight.detach().clone())
        student.config.tie_word_embeddings = False
    for p in student.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    st = KDSettings(loss_chunk=5, alpha_ce=0.5, temperature=2.0)
    xs = [torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    arriving = []
    student.get_input_embeddings().weight.register_hook(lambda g: arriving.append(g.layout))

    def grads(compact_: bool):
        student.zero_grad(set_to_none=True)
        forwards = compact_forwards(student) if compact_ else []
        for x in xs:
            labels = x[:, 1:].reshape(-1)
            with compact(forwards):
                s_h = hidden_and_head(student)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
            with torch.no_grad():
                t_h = hidden_and_head(teacher)[0](input_ids=x[:, :-1]).last_hidden_state.reshape(labels.numel(), -1)
            (chunked_loss(s_h, t_h, labels, student, teacher, st, head_grad_into_weight=True)[0] / 2).backward()
        return {n: p.grad.clone() for n, p in student.named_parameters()}

    plain = grads(False)
    arriving.clear()
    fused = grads(True)
    emb = student.get_input_embeddings()
    assert (emb in [m for m, _ in compact_forwards(student)]) == tied
    assert arriving == ([torch.sparse_coo] * 2 if tied else [torch.strided] * 2)
    assert not emb.sparse  # restored after each forward
    for name, g in plain.items():
        assert fused[name].layout == torch.strided and torch.allclose(fused[name], g, rtol=1e-4, atol=1e-7), name
    torch.optim.AdamW(student.parameters(), fused=True).step()  # dense gradients: the trainer's optimizer takes them
