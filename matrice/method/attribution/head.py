"""P(y*) at the answer position and its gradient through the LM head, in one pass over the vocabulary.

The LM head of a multilingual model is its largest matrix (Gemma 3 270M: 262,144 × 640, 76% of the
attribution's FLOPs). Plain autograd materialises the [rows, V] logits, their float32 copy, the
softmax and its backward: four [rows, V] arrays that stream through memory, and reads W twice in two
separate passes. Here, for each chunk of the vocabulary (an online softmax, as in flash attention):

    z_c = h·W_cᵀ (+ b_c),  l_c = cap·tanh(z_c/cap) if the model soft-caps its logits, else z_c
    running max m, running Σ_{v≠y} exp(l_v − m) and Σ_{v≠y} exp(l_v − m)·l'(z_v)·W_v  (rescaled as m grows)

so P(y*) and ∂P/∂h = P(y*)·(l'(z_y)·(1 − P(y*))·W_y − Σ_{v≠y} p_v·l'(z_v)·W_v) come out together;
the [rows, chunk] block stays in cache and W_c is read twice while it is hot. Exact up to float
rounding; `autograd_answer_probability` is the plain reference the tests compare it with.
"""

from __future__ import annotations

import torch

from matrice.method.attribution.common import answer_probability
from matrice.models.head import LinearHead, checked_ids, chunk_logits, default_chunk


def autograd_answer_probability(hidden: torch.Tensor, head: LinearHead, answer_id: int) -> torch.Tensor:
    """Reference: full logits, the oracle's float64 softmax, autograd does the rest. [R, d] -> [R]."""
    return answer_probability(head.logits(hidden), answer_id)


def _prob_and_grad(hidden: torch.Tensor, head: LinearHead, answer_ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P(y*) and ∂P/∂h = P·(l'_y·(1 − P)·W_y − Σ_{v≠y} p_v·l'_v·W_v).

    The answer's own term is kept out of the running sums: written as W_y − Σ_v p_v W_v, a confident
    answer (P ≈ 0.9) cancels ~90% of W_y in float32 and leaves an error of ~1e-4 of the gradient;
    this form (autograd's softmax backward does the same) keeps it at float rounding."""
    rows = hidden.shape[0]
    weight = head.weight
    checked_ids(answer_ids, weight.shape[0])
    row_index = torch.arange(rows, device=hidden.device)
    answer_logit = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    answer_slope = torch.ones(rows, dtype=torch.float32, device=hidden.device)
    running_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
    other_sum = torch.zeros(rows, dtype=torch.float32, device=hidden.device)  # Σ_{v≠y} exp(l_v − max)
    other_rows = torch.zeros(rows, weight.shape[1], dtype=torch.float32, device=hidden.device)  # Σ_{v≠y} e_v l'_v W_v
    for start, w_chunk, logit, slope in chunk_logits(hidden, head, chunk):
        new_max = torch.maximum(running_max, logit.amax(dim=1))
        rescale = torch.exp(running_max - new_max)
        e = (logit - new_max[:, None]).exp_()
        here = (answer_ids >= start) & (answer_ids < start + w_chunk.shape[0])
        if here.any():
            rows_here, cols = row_index[here], answer_ids[here] - start
            answer_logit[here] = logit[rows_here, cols]
            if slope is not None:
                answer_slope[here] = slope[rows_here, cols]
            e[rows_here, cols] = 0.0
        other_sum = other_sum * rescale + e.sum(dim=1)
        weights = e if slope is None else e * slope
        other_rows = other_rows * rescale[:, None] + (weights.to(w_chunk.dtype) @ w_chunk).float()
        running_max = new_max
    answer_e = torch.exp(answer_logit - running_max)
    total = other_sum + answer_e
    prob = answer_e / total
    own = (answer_slope * other_sum / total)[:, None] * weight[answer_ids].float()
    grad = prob[:, None] * (own - other_rows / total[:, None])
    return prob, grad


class _FusedAnswerProbability(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, softcap, answer_ids, chunk):  # type: ignore[override]
        prob, grad = _prob_and_grad(hidden.detach(), LinearHead(weight, bias, softcap), answer_ids, chunk)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return prob

    @staticmethod
    def backward(ctx, grad_prob):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad_prob[:, None] * grad).to(ctx.hidden_dtype), None, None, None, None, None


def fused_answer_probability(
    hidden: torch.Tensor, head: LinearHead, answer_ids: int | torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """P(y*) [R] (float32) from head inputs [R, d]; `answer_ids` is one id or one per row (rows of
    several queries share one pass). Differentiable with respect to `hidden` only (the head's weights
    are frozen during attribution)."""
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError("fused_answer_probability differentiates only the hidden state; freeze the head")
    hidden = hidden.to(head.weight.device)  # a model spread over devices: the head may sit on another
    ids = torch.as_tensor(answer_ids, dtype=torch.long, device=hidden.device).expand(hidden.shape[0])
    return _FusedAnswerProbability.apply(
        hidden, head.weight, head.bias, head.softcap, ids, chunk or default_chunk(hidden.device)
    )
