"""Pieces shared by the reference and the fast SAIG engines: config, w̄ and w' activations, P(y*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import answer_steps
from matrice.models.hooks import neuron_hooks
from matrice.models.whole_answer import check_policy

BaselineKind = Literal["saig", "amig", "zero"]
BASELINE_KINDS = ("saig", "amig", "zero")
Integration = Literal["riemann_right", "gauss_legendre"]
INTEGRATIONS = ("riemann_right", "gauss_legendre")
AnswerToken = Literal["first", "all"]  # matrice.models.whole_answer.ANSWER_POLICIES


@dataclass(frozen=True)
class AttributionConfig:
    """`saig`: one baseline per query token (that token -> PAD; MATRICE Eq. 3); `amig`: one baseline
    with every query token -> PAD; `zero`: one all-zero baseline (Dai et al., EleutherAI)."""

    steps: int = 4
    baseline: BaselineKind = "saig"
    batch_size: int = 512  # rows (layer, baseline, step) per forward/backward, across queries, in the fast engine
    integration: Integration = "riemann_right"  # the paper's Eq. 4; gauss_legendre: same rows, smaller error
    answer_token: AnswerToken = "first"  # all: every answer token, teacher-forced, maps averaged (answer_steps)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "AttributionConfig":
        return cls(steps=params["steps"], baseline=params["baseline"], batch_size=params["attribute"]["batch_size"],
                   integration=params.get("integration", "riemann_right"),
                   answer_token=params.get("answer_token", "first"))

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.baseline not in BASELINE_KINDS:
            raise ValueError(f"baseline must be one of {BASELINE_KINDS}, got {self.baseline!r}")
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {INTEGRATIONS}, got {self.integration!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_policy(self.answer_token)


def over_answer_tokens(attribute: Callable[[Encoded], torch.Tensor], adapter: ModelAdapter, enc: Encoded,
                       cfg: AttributionConfig) -> torch.Tensor:
    """``attribute(enc)`` for ``answer_token: first``; for ``all`` the mean of the per-token maps over
    the whole teacher-forced sequence (:func:`answer_steps`), the reference engines' rule."""
    if cfg.answer_token == "first":
        return attribute(enc)
    return torch.stack([attribute(step) for step in answer_steps(adapter, enc, whole_sequence=True)]).mean(dim=0)


def all_layers(adapter: ModelAdapter) -> list[int]:
    return list(range(adapter.n_layers))


@torch.no_grad()
def target_activations(adapter: ModelAdapter, input_ids: torch.Tensor, target_pos: int) -> torch.Tensor:
    """Neurons of every layer at the target position for each row of `input_ids`: [B, L, N]."""
    positions = torch.full((input_ids.shape[0],), target_pos, dtype=torch.long)
    layers = all_layers(adapter)
    with neuron_hooks(adapter, positions, capture=layers) as captured:
        adapter.model.base_model(input_ids=input_ids.to(adapter.device))  # activations only: no LM head
    return torch.stack([captured[l] for l in layers], dim=1)


def baseline_inputs(adapter: ModelAdapter, enc: Encoded, kind: BaselineKind) -> torch.Tensor:
    """Baseline sentences: [m, T] for saig (token i -> PAD), [1, T] for amig (all -> PAD)."""
    ids = torch.tensor(enc.input_ids, dtype=torch.long)
    if kind == "saig":
        rows = ids.repeat(len(enc.baseline_positions), 1)
        for row, pos in enumerate(enc.baseline_positions):
            rows[row, pos] = adapter.baseline_token_id
        return rows
    rows = ids[None].clone()
    rows[0, enc.baseline_positions] = adapter.baseline_token_id
    return rows


def baseline_activations(adapter: ModelAdapter, enc: Encoded, kind: BaselineKind, original: torch.Tensor) -> torch.Tensor:
    """w' of every baseline, layer and neuron at the target position: [B, L, N]."""
    if kind == "zero":
        return torch.zeros_like(original)[None]
    if not enc.baseline_positions:
        raise ValueError("query has no tokens to build SAIG baselines from")
    return target_activations(adapter, baseline_inputs(adapter, enc, kind), enc.target_pos)


def query_activations(adapter: ModelAdapter, enc: Encoded, kind: BaselineKind) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the full-sequence engines start from: input ids [1, T], w̄ [L, N] and w' [B, L, N]."""
    ids = torch.tensor([enc.input_ids], dtype=torch.long, device=adapter.device)
    original = target_activations(adapter, ids, enc.target_pos)[0]
    return ids, original, baseline_activations(adapter, enc, kind, original)


def answer_probability(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(y*) from target-position logits [R, V], softmax in float64 whatever the model dtype.

    A float32 softmax over a 262k vocabulary is off by ~1e-5 in its denominator; for a confident
    answer that becomes ~1e-4 in 1 − P and in the gradient (measured on Gemma 3 270M against a
    float64 model). The reference engines are oracles and must not carry that error."""
    return torch.softmax(logits.double(), dim=-1)[:, answer_id]


def quadrature(steps: int, integration: Integration = "riemann_right") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes a_k in (0, 1] and weights c_k of ∫_0^1 f(a) da ≈ Σ_k c_k f(a_k), float64.

    riemann_right: a_k = k/M, c_k = 1/M (the paper's Eq. 4). gauss_legendre: the M Legendre nodes
    mapped to (0, 1); exact for polynomials of degree 2M − 1, so far fewer rows reach a given error."""
    if integration == "riemann_right":
        nodes = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        return nodes, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if integration == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    raise ValueError(f"integration must be one of {INTEGRATIONS}, got {integration!r}")


def step_points(w_base: torch.Tensor, w_orig: torch.Tensor, steps: int, integration: Integration = "riemann_right") -> torch.Tensor:
    """Points w' + a_k (w̄ − w') at the quadrature nodes (right Riemann: a_k = k/M, k = 1..M):
    [..., M, N] for w_base [..., N]."""
    k = quadrature(steps, integration)[0].to(dtype=w_orig.dtype, device=w_orig.device)
    return w_base[..., None, :] + k[:, None] * (w_orig - w_base)[..., None, :]


def integrate(delta: torch.Tensor, grads: torch.Tensor, steps: int, integration: Integration) -> torch.Tensor:
    """Attr = (w̄ − w') · Σ_k c_k ∂P/∂w(a_k): delta [..., N], grads [..., M, N] -> [..., N], float32."""
    weights = quadrature(steps, integration)[1].to(dtype=torch.float32, device=grads.device)
    return delta.float() * (grads.float() * weights[:, None]).sum(dim=-2)
