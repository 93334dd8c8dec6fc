"""Distillation losses as pure functions.

Shapes: `s` student logits and `t` teacher logits are (N, V) for N token positions
(flatten batch and time first); every loss returns (N,) per-position values so callers
can mask, chunk and sum. Temperature T softens both distributions and the result is
multiplied by T**2 so gradient magnitudes do not shrink with T (Hinton et al., 2015).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # half-precision logits are upcast: log_softmax over a large vocabulary loses too much in fp16/bf16
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return F.log_softmax(x / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities: (N, V) -> (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w*a + (1-w)*b), computed in log space for stability."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1.0 - weight_a))


def forward_kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_t || p_s): mode-covering; the classic KD loss (Hinton et al., 2015)."""
    return _kl(_log_probs(t, temperature), _log_probs(s, temperature)) * temperature**2


def reverse_kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_s || p_t): mode-seeking (MiniLLM, Gu et al., 2024)."""
    return _kl(_log_probs(s, temperature), _log_probs(t, temperature)) * temperature**2


def skew_forward_kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """KL(p_t || a*p_t + (1-a)*p_s): DistiLLM's skew KL (Ko et al., 2024); a=0 is forward KL."""
    lt, ls = _log_probs(t, temperature), _log_probs(s, temperature)
    return _kl(lt, _log_mix(lt, ls, alpha)) * temperature**2


def skew_reverse_kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """KL(p_s || a*p_s + (1-a)*p_t): DistiLLM's skew reverse KL; a=0 is reverse KL."""
    lt, ls = _log_probs(t, temperature), _log_probs(s, temperature)
    return _kl(ls, _log_mix(ls, lt, alpha)) * temperature**2


def generalized_jsd(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """beta*KL(p_t || m) + (1-beta)*KL(p_s || m), m = beta*p_t + (1-beta)*p_s (GKD, Agarwal et al., 2024).

    Tends to beta*KL(p_t||p_s) as beta->0 and (1-beta)*KL(p_s||p_t) as beta->1; at the
    end points themselves GKD uses the plain KLs, and so do we.
    """
    if beta <= 0.0:
        return forward_kl(s, t, temperature)
    if beta >= 1.0:
        return reverse_kl(s, t, temperature)
    lt, ls = _log_probs(t, temperature), _log_probs(s, temperature)
    lm = _log_mix(lt, ls, beta)
    return (beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)) * temperature**2


def total_variation(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """0.5 * sum |p_t - p_s| (bounded in [0, 1]; Wen et al., 2023, f-divergence KD)."""
    diff = _log_probs(t, temperature).exp() - _log_probs(s, temperature).exp()
    return 0.5 * diff.abs().sum(-1) * temperature**2


def cross_entropy(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label CE per position; labels (N,), -100 ignored (gives 0)."""
    return F.cross_entropy(s.float(), labels, ignore_index=-100, reduction="none")


def forward_kl_topk(s: torch.Tensor, t_logprobs: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
    """Forward KL against a sparse teacher: its top-k log-probs (N, k) at vocab ids (N, k).

    The teacher mass outside the top k is kept as one "tail" bucket, and compared with
    the student's mass outside the same k ids, so the loss is a true KL over k+1 events
    (not a renormalised top-k, which would overstate the teacher's confidence).
    """
    ls = F.log_softmax(s.float(), dim=-1)
    ls_k = ls.gather(-1, t_index)  # (N, k)
    t_tail = torch.log1p(-t_logprobs.exp().sum(-1).clamp(max=1 - 1e-6))  # (N,)
    s_tail = torch.log1p(-ls_k.exp().sum(-1).clamp(max=1 - 1e-6))
    head = (t_logprobs.exp() * (t_logprobs - ls_k)).sum(-1)
    return head + t_tail.exp() * (t_tail - s_tail)


KD_LOSSES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
}


def kd_loss(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float,
            skew_alpha: float = 0.1, jsd_beta: float = 0.5) -> torch.Tensor:
    """Dispatch by the recipe's loss name: (N, V), (N, V) -> (N,)."""
    fn = KD_LOSSES[name]
    if name.startswith("skew"):
        return fn(s, t, temperature, alpha=skew_alpha)
    if name == "jsd":
        return fn(s, t, temperature, beta=jsd_beta)
    return fn(s, t, temperature)
