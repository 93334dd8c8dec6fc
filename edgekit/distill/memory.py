"""Expected peak memory of a training stage (distill / qat), before anything loads.

Counts come from the models' configs (a meta-device instance: exact parameter counts,
no weights read). Bytes per parameter:
    teacher weights   fp32 4, fp16 2; int8: Linear 1 (+ fp32 row scales), nf4: Linear 0.5
                      + double-quantized absmax (~0.02) (bitsandbytes quantizes the Linear
                      layers inside the blocks); with either, the embeddings and output head
                      are int8 rows + a fp32 scale each (models.int8_rows), norms fp32
    student weights   4 (fp32 training; bf16 is ~25x slower on CPUs)
    gradients         4 per trainable parameter (all of them, or the LoRA adapters)
    optimizer states  AdamW 8 per trainable parameter; 8-bit AdamW 2 (+ fp32 absmax per 256)
Activations kept for backward, per token and student layer, in fp32 floats: ~8 H
(norm inputs, q/k/v, attention output, residual inputs) + 2 I (gate, up): the trainer's
compact gated MLP and RMSNorm recompute the activation, the product and the normalised input
(distill.activations); ~10 H + 4 I under FSDP or bf16 autocast, where plain autograd keeps
those too. Measured on the quickstart pair and checked by a test. The fused loss adds ~4 chunk x V logits-sized
buffers (student and teacher logits, a softmax or log-sum-exp temporary, its gradient;
the chunk is lowered at large vocabularies to keep them within 512 MB), its (V, H) head gradient
being the weight's .grad in one process (a buffer more under torchrun); the optimizer step adds
temporaries (see `estimate`). The Python + torch + transformers runtime itself is ~350 MB on Linux. Measured peaks are process RSS: a
teacher memory-mapped from safetensors counts once its pages are touched (every step).

Under torchrun with N processes, each process trains on batch/N rows; a sharded (FSDP2)
student holds 1/N of its block weights, gradients and optimizer states, plus, gathered,
its embeddings/head/norms (the root unit, whole for the step) and two decoder layers
(the one computing and the next); a sharded teacher likewise holds 1/N of its block
weights plus two gathered layers, its embeddings and head whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from edgekit.recipe.schema import TrainSettings


MB = 2**20
RUNTIME_MB = 350.0
# floats kept per token per layer, per hidden / intermediate unit: compact modules or plain autograd
ACT_FLOATS_H, ACT_FLOATS_I = {True: 8, False: 10}, {True: 2, False: 4}
LOGIT_BUFFERS = 4
LOGITS_BUDGET = 512 * MB  # bytes of (C, V) fp32 buffers one loss chunk may hold


def loss_chunk_rows(requested: int, vocab: int) -> int:
    """Positions per loss chunk: the recipe's `loss_chunk`, lowered (to a power of two) so a chunk's
    ~4 (C, V) fp32 buffers stay within LOGITS_BUDGET: up to 512 at SmolLM2's 49k vocabulary, 128
    at Gemma 3's 262k. Smaller chunks cost speed: at 262k the heads + loss of 1024 positions
    took 14.0 / 12.0 / 11.2 s with 64 / 128 / 256-position chunks (2-core Xeon), mostly the
    output-head matmuls, which re-read the (V, H) weights once per chunk."""
    fits = LOGITS_BUDGET // (4 * LOGIT_BUFFERS * vocab)
    return max(8, min(requested, 1 << max(3, fits.bit_length() - 1)))


@dataclass
class ModelCounts:
    params: int        # all parameters
    block_linear: int  # parameters of the Linear layers inside the decoder blocks (what bnb quantizes)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    largest: int = 0   # the largest single tensor (usually the embedding)


def counts(config) -> ModelCounts:
    """Parameter counts of a transformers causal LM config, from a meta-device instance."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    block_linear = sum(m.weight.numel() for m in model.modules()
                       if isinstance(m, torch.nn.Linear) and m is not head)
    return ModelCounts(sum(p.numel() for p in model.parameters()), block_linear, config.num_hidden_layers,
                       config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size),
                       config.vocab_size, max(p.numel() for p in model.parameters()))


def held_blocks(m: ModelCounts, processes: int, sharded: bool) -> float:
    """Block-Linear parameters one process holds: all, or its 1/N shard + two gathered layers."""
    if not sharded or processes <= 1:
        return float(m.block_linear)
    return m.block_linear / processes + 2 * m.block_linear / m.layers


def teacher_bytes(t: ModelCounts, load: str | None, processes: int = 1, sharded: bool = False) -> float:
    other = t.params - t.block_linear
    per_linear = {None: 4.0, "fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0 + 4.0 / t.hidden, "nf4": 0.5 + 0.02}[load]
    per_other = {"fp16": 2.0, "bf16": 2.0, "int8": 1.0 + 4.0 / t.hidden, "nf4": 1.0 + 4.0 / t.hidden}.get(load, 4.0)
    return held_blocks(t, processes, sharded) * per_linear + other * per_other


def lora_params(r: int, targets: list[str], config) -> int:
    """r * (in + out) per adapted Linear: from the student's real module shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def estimate(teacher: ModelCounts | None, student: ModelCounts, *, teacher_load: str | None, optimizer: str,
             batch: int, seq_len: int, loss_chunk: int, trainable: int | None = None,
             on_gpu: bool = False, processes: int = 1, shard_student: bool = False,
             shard_teacher: bool = False, bf16_heads: bool = False) -> dict[str, float]:
    """Expected peak of one training stage, in MB, by component, and `total_mb`: process
    memory on a CPU machine, device memory with `on_gpu`; per process under torchrun.
    `bf16_heads`: the fused loss multiplies the heads in bf16 (precision.bf16_heads)."""
    trainable = student.params if trainable is None else trainable
    n = max(1, processes)
    tokens = max(1, batch // n) * (seq_len - 1)
    sharded = shard_student and n > 1
    held = held_blocks(student, n, sharded) + student.params - student.block_linear  # weights this process holds
    trained = trainable / n if sharded else trainable  # its share of gradients and optimizer states
    opt_bytes = 8.0 if optimizer == "adamw" else 2.0 + 8.0 / 256
    parts = {
        "runtime": RUNTIME_MB * MB,
        "teacher_weights": teacher_bytes(teacher, teacher_load, n, shard_teacher) if teacher else 0.0,
        "student_weights": 4.0 * held,
        # sharded: the shard's gradients + the gathered root unit's, until they are reduce-scattered
        "gradients": 4.0 * (trained + (student.params - student.block_linear if sharded else 0)),
        "optimizer_states": opt_bytes * trained,
        # the compact modules run where the trainer uses them: an unsharded student, no autocast (CPU)
        "activations": 4.0 * tokens * student.layers * (ACT_FLOATS_H[not sharded and not on_gpu] * student.hidden
                                                        + ACT_FLOATS_I[not sharded and not on_gpu] * student.intermediate),
        "logits_chunk": 4.0 * LOGIT_BUFFERS * min(loss_chunk_rows(loss_chunk, student.vocab), tokens) * student.vocab,
        # the fused loss accumulates the output head's gradient in its own (V, H) buffer; in one
        # process that buffer becomes the head's .grad (counted above, trainer._owns_grad), under
        # torchrun autograd adds it to the tied embedding's into another
        "head_grad_buffer": 4.0 * student.vocab * student.hidden if trainable == student.params and n > 1 else 0.0,
        # bf16 heads (trainer.Bf16HeadMatmuls): the student head's bf16 copy and gradient sum live
        # in its fp32 gradient's buffer (counted above); an fp32 teacher head's bf16 copy is extra
        "bf16_heads": (2.0 * student.vocab * student.hidden
                       if bf16_heads and teacher is not None and teacher_load in (None, "fp32") else 0.0),
        # the step's temporaries: the fused AdamW (distill.lean) none to speak of, PyTorch's default
        # one that sharded students keep ~one parameter-sized list; bitsandbytes' CPU path dequantizes each
        # tensor's states to fp32 (~4 copies of the largest tensor)
        "optimizer_step": ((4.0 * trained if sharded else 0.0) if optimizer == "adamw"
                           else 16.0 * min(trainable, student.largest or trainable)),
    }
    out = {f"{k}_mb": round(v / MB, 1) for k, v in parts.items()}
    out["total_mb"] = round(sum(parts.values()) / MB, 1)
    return out


def machine_memory_mb() -> float:
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MB


@functools.lru_cache(maxsize=8)  # validate reads the teacher's config twice (support, memory); from a GGUF that takes seconds
def model_config(spec: str, base, trust_remote_code: bool = False, revision: str | None = None):
    """A model's transformers config without loading weights; None for a hub id whose config
    is not in the local cache (validate never downloads)."""
    from transformers import AutoConfig

    from edgekit.models.sources import cache_dir, classify

    kind = classify(spec, base)
    if kind in ("embedded", "gguf"):
        if kind == "embedded":
            from edgekit.models.embedded import get_embedded

            gguf = get_embedded(spec.removeprefix("embedded:")).gguf_path(cache_dir())
        else:
            gguf = (base / spec).expanduser().resolve()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            cfg = hf_hub_download(spec, "config.json", revision=revision, local_files_only=True)
            return AutoConfig.from_pretrained(cfg.rsplit("/", 1)[0], trust_remote_code=trust_remote_code)
        except Exception:  # not downloaded yet: the estimate is skipped, nothing else depends on it
            return None
    return AutoConfig.from_pretrained((base / spec).expanduser(), trust_remote_code=trust_remote_code)


def _not_cached(spec: str) -> str:
    return (f"no memory estimate: the config of '{spec}' is not in the local hub cache "
            f"(`huggingface-cli download {spec} config.json` fetches it)")


def recipe_estimates(recipe, base, processes: int = 1) -> list[tuple[str, dict]] | str:
    """[(stage type, estimate)] for each training stage of a recipe, per process when
    `processes` run it under torchrun, or why there is none."""
    import copy

    from edgekit.models.student import layers_to_keep, narrow_width

    t = recipe.teacher
    tcfg = model_config(t.model, base, t.trust_remote_code, t.revision)
    if tcfg is None:
        return _not_cached(t.model)
    s = recipe.student
    if s.init == "teacher_layers":
        scfg = copy.deepcopy(tcfg)
        scfg.num_hidden_layers = len(layers_to_keep(tcfg.num_hidden_layers, s.keep_every, s.keep_layers))
        if s.mlp_keep is not None:
            scfg.intermediate_size = narrow_width(scfg.intermediate_size, s.mlp_keep)
    else:
        scfg = model_config(s.model, base, s.trust_remote_code)
        if scfg is None:
            return _not_cached(s.model)
    import torch

    from edgekit.distill.precision import bf16_heads

    teacher, student = counts(tcfg), counts(scfg)
    on_gpu = torch.cuda.is_available()
    out = []
    distilled = any(st.type == "distill" for st in recipe.stages)
    for st in recipe.stages:
        if not isinstance(st, TrainSettings):  # only training stages hold models, gradients and optimizer state
            continue
        trained = student if distilled or st.type == "distill" else teacher  # QAT alone trains the teacher's weights
        lora = getattr(st, "lora", None)
        trainable = lora_params(lora.r, lora.targets, scfg) if lora else None
        par = st.parallel
        out.append((st.type, estimate(teacher, trained, teacher_load=t.weights, optimizer=st.optimizer,
                                      batch=st.batch_size, seq_len=recipe.data.seq_len, loss_chunk=st.loss_chunk,
                                      trainable=trainable, on_gpu=on_gpu, processes=processes,
                                      shard_student=par.student == "sharded", shard_teacher=par.teacher == "sharded",
                                      bf16_heads=bf16_heads(torch.device("cuda" if on_gpu else "cpu"), st.precision))))
    return out
