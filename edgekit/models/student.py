"""Student initialisation: a subset of the teacher's layers, or an existing smaller model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from edgekit.errors import EdgekitError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def layers_to_keep(n_layers: int, keep_every: int | None, keep_layers: list[int] | None) -> list[int]:
    """Every k-th layer, always including the first and the last (they matter most:
    embeddings in, logits out; see Minitron and ShortGPT's block-importance results).
    `block_importance` + `most_important` choose the same number of layers by measurement."""
    if keep_layers:
        bad = [i for i in keep_layers if i >= n_layers]
        if bad:
            raise EdgekitError(f"student.keep_layers has {bad}, but the teacher has only {n_layers} layers (0..{n_layers - 1})",
                               "use indices below the teacher's layer count")
        return list(keep_layers)
    k = keep_every or 1
    keep = sorted(set(range(0, n_layers, k)) | {n_layers - 1})
    return keep


def calibrate(model, rows, handles: list, batch: int) -> int:
    """Run the decoder trunk over calibration rows (N, T) in batches, no grad, so that the
    measuring hooks in `handles` see every token; removes the hooks. Returns the token count."""
    import torch

    count = 0
    try:
        with torch.no_grad():
            for i in range(0, rows.shape[0], batch):
                chunk = rows[i: i + batch]
                model.get_decoder()(input_ids=chunk)
                count += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    return count


def block_importance(model, rows, batch: int = 4) -> list[float]:
    """Block Influence of each decoder layer (ShortGPT, Men et al., 2024; the depth-pruning
    importance of Minitron, Muralidharan et al., 2024): 1 - mean over tokens of cos(layer
    input, layer output) on calibration rows (N, T). A layer that barely turns the residual
    stream scores near 0 and is the cheapest to drop."""
    import torch

    layers = model.get_decoder().layers
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook(i):
        def measure(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            y = output[0] if isinstance(output, (tuple, list)) else output
            sums[i] += torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum().double()
        return measure

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = calibrate(model, rows, handles, batch)
    return (1 - sums / max(count, 1)).tolist()


def most_important(scores: list[float], n: int) -> list[int]:
    """The `n` layers of highest importance, in model order."""
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:n])


def narrow_width(width: int, fraction: float) -> int:
    """MLP channels kept of `width`: the fraction, rounded to a multiple of 32 (GGUF's block
    size; multiples of 256 also keep Q4_K for the down projection), at least 32."""
    return min(width, max(32, round(width * fraction / 32) * 32))


def _mlp(layer):
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise EdgekitError(f"MLP width pruning needs gate_proj/up_proj/down_proj MLPs; {type(layer).__name__} has another layout",
                           "remove student.mlp_keep for this architecture")
    return mlp


def mlp_channel_importance(model, rows, batch: int = 4) -> list:
    """Per layer, each MLP channel's mean |activation| (the input of down_proj: act(gate) * up)
    over the tokens of calibration rows (N, T): Minitron's activation-based width importance
    (Muralidharan et al., 2024). Returns one (intermediate,) tensor per decoder layer."""
    import torch

    layers = model.get_decoder().layers
    sums = [torch.zeros(_mlp(layer).down_proj.in_features, dtype=torch.float64) for layer in layers]

    def hook(i):
        def measure(_module, args):
            sums[i] += args[0].detach().abs().double().sum(dim=(0, 1))
        return measure

    handles = [_mlp(layer).down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    count = calibrate(model, rows, handles, batch)
    return [x / max(count, 1) for x in sums]


def narrow_mlps(model, fraction: float, scores: list) -> dict:
    """Keep the most important `narrow_width(...)` channels of every MLP (the same number in
    each layer, chosen per layer): rows of gate/up, columns of down. The model's config
    records the new intermediate size, so it saves, exports and reloads as a plain model."""
    import torch

    width = model.config.intermediate_size
    new = narrow_width(width, fraction)
    kept = []
    with torch.no_grad():
        for layer, score in zip(model.get_decoder().layers, scores):
            mlp = _mlp(layer)
            idx = torch.sort(torch.topk(score, new).indices).values
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight = torch.nn.Parameter(proj.weight[idx].clone())
                if proj.bias is not None:
                    proj.bias = torch.nn.Parameter(proj.bias[idx].clone())
                proj.out_features = new
            mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, idx].clone())
            mlp.down_proj.in_features = new
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = new
            kept.append(float(score[idx].sum() / score.sum()) if float(score.sum()) > 0 else 1.0)
    model.config.intermediate_size = new
    return {"intermediate_size": [width, new], "importance_kept_per_layer": [round(k, 4) for k in kept]}


def init_from_teacher_layers(teacher, keep: list[int]):
    """A new model with the teacher's embeddings, head and the kept decoder layers (copied)."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(cfg)
    remap = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = re.match(r"(.*\.layers\.)(\d+)(\..*)", key)
        if m:
            old = int(m.group(2))
            if old not in remap:
                continue
            key = f"{m.group(1)}{remap[old]}{m.group(3)}"
        state[key] = value.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise EdgekitError(f"student init could not map teacher weights (missing {missing[:3]}, unexpected {unexpected[:3]})",
                           "this architecture's layer naming is not supported for layer selection")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    from edgekit.models.sources import GGUF_TOKENIZER_FILE

    for name in TOKENIZER_FILES + (GGUF_TOKENIZER_FILE,):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if not any((dst / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise EdgekitError(f"{src} has no tokenizer files to give the student",
                           "the model directory is incomplete (or its cache entry was being rebuilt by another "
                           "edgekit process): rerun; if it persists, delete it and let edgekit convert it again")


def check_same_vocab(teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Logit KD compares distributions token by token: both must share one vocabulary."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        raise EdgekitError(
            f"teacher '{teacher_name}' ({len(tv)} tokens) and student '{student_name}' ({len(sv)} tokens) have different "
            f"vocabularies ({only_t} tokens only in the teacher, {only_s} only in the student), so token-level KD cannot compare their logits",
            "use a student with the teacher's tokenizer (student.init: teacher_layers), or sequence-level KD on teacher-generated text")
