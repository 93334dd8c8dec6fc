"""Hidden-state distillation: the student's layer outputs are pulled toward the teacher's.

Each mapped student layer's output (B, T, H_s) is compared with one teacher layer's output
(B, T, H_t), per trained position, after a learned projection H_s -> H_t where the widths
differ (TinyBERT, Jiao et al., 2020; FitNets' "hint" regressor, Romero et al., 2015). The
layer map defaults to where each student layer came from (student.init: teacher_layers),
else to uniform spacing (student layer i -> teacher layer (i+1)*L_t/L_s - 1).

Losses, per position, averaged over positions and mapped layers:
- cosine: 1 - cos(p(h_s), h_t); scale-free, so a few outlier channels of large norm (common
  in LLM residual streams) do not dominate;
- mse: ||p(h_s) - h_t||^2 / ||h_t||^2, mean squared error relative to the teacher's norm.

The projections are trained with the student, checkpointed with it, and never exported.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from edgekit.errors import EdgekitError


def auto_layer_map(n_student: int, n_teacher: int, kept: list[int] | None) -> dict[int, int]:
    """Student layer -> teacher layer: the source layer when the student was cut from the
    teacher, else the teacher layer at the same relative depth (last maps to last)."""
    if kept is not None and len(kept) == n_student:
        return {i: t for i, t in enumerate(kept)}
    return {i: round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)}


def check_layer_map(layer_map: dict[int, int], n_student: int, n_teacher: int) -> None:
    bad = [f"{s}->{t}" for s, t in layer_map.items() if not (0 <= s < n_student and 0 <= t < n_teacher)]
    if bad:
        raise EdgekitError(f"hidden_states.layer_map has pairs outside the models: {', '.join(bad)} "
                           f"(student has layers 0..{n_student - 1}, teacher 0..{n_teacher - 1})",
                           "map student layer indices to teacher layer indices that exist, or leave layer_map unset")


def position_loss(kind: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(N, H) projected student and (N, H) teacher states -> (N,) per-position loss."""
    t = t.to(s.dtype)
    if kind == "cosine":
        return 1 - nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-6)
    return ((s - t) ** 2).sum(-1) / (t**2).sum(-1).clamp_min(1e-6)


def _layers(model) -> nn.ModuleList:
    return model.get_decoder().layers


@contextlib.contextmanager
def capture(model, indices: list[int], detach: bool):
    """Record the outputs of decoder layers `indices` during the forward passes inside the
    block: {layer index: (B, T, H)}. Hooks are removed on exit."""
    states: dict[int, torch.Tensor] = {}
    layers = _layers(model)

    def hook(i):
        def record(_module, _inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            states[i] = h.detach() if detach else h
        return record

    handles = [layers[i].register_forward_hook(hook(i)) for i in indices]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


class HiddenAlign(nn.Module):
    """The layer map, its projections and the loss. `projections[str(s)]` exists only for
    student layers whose width differs from the mapped teacher layer's."""

    def __init__(self, layer_map: dict[int, int], s_width: int, t_width: int, loss: str, weight: float, seed: int):
        super().__init__()
        self.layer_map, self.kind, self.weight = dict(sorted(layer_map.items())), loss, weight
        gen = torch.Generator().manual_seed(seed)  # every process starts from the same projections
        self.projections = nn.ModuleDict()
        if s_width != t_width:
            for s in self.layer_map:
                p = nn.Linear(s_width, t_width, bias=False)
                with torch.no_grad():  # least-squares-friendly start: orthogonal-ish, unit gain
                    p.weight.copy_(torch.randn(t_width, s_width, generator=gen) / s_width**0.5)
                self.projections[str(s)] = p

    @classmethod
    def build(cls, cfg, student, teacher, kept: list[int] | None, seed: int) -> "HiddenAlign":
        n_s, n_t = len(_layers(student)), len(_layers(teacher))
        layer_map = ({int(s): int(t) for s, t in cfg.layer_map.items()} if cfg.layer_map
                     else auto_layer_map(n_s, n_t, kept))
        check_layer_map(layer_map, n_s, n_t)
        return cls(layer_map, student.config.hidden_size, teacher.config.hidden_size, cfg.loss, cfg.weight, seed)

    def loss(self, s_states: dict[int, torch.Tensor], t_states: dict[int, torch.Tensor],
             keep: torch.Tensor) -> torch.Tensor:
        """Mean over mapped layers of the mean per-position loss on `keep` (B*T,) positions."""
        total = torch.zeros((), device=keep.device)
        if not keep.any():
            return total
        for s, t in self.layer_map.items():
            hs = s_states[s].reshape(keep.numel(), -1)[keep]  # (N, H_s)
            ht = t_states[t].reshape(keep.numel(), -1)[keep]  # (N, H_t)
            if str(s) in self.projections:
                hs = self.projections[str(s)](hs)
            total = total + position_loss(self.kind, hs, ht).mean()
        return self.weight * total / len(self.layer_map)

    def describe(self) -> dict:
        return {"layer_map": {str(s): t for s, t in self.layer_map.items()}, "loss": self.kind, "weight": self.weight,
                "projection_params": sum(p.numel() for p in self.parameters())}
