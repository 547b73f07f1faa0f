"""One object that knows how a loaded model exposes its FFN neurons, pads, predicts and is edited."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from matrice.models.families import Family, UnsupportedArchitectureError, family_for


@dataclass(frozen=True)
class Encoded:
    """A tokenised query: ids, where the answer is predicted, the gold answer's ids, baseline slots."""

    input_ids: list[int]
    target_pos: int
    answer_ids: list[int]
    baseline_positions: list[int]  # the query's own tokens (no special tokens, no few-shot prefix, no mask)


class ModelAdapter:
    """Wraps a transformers model + tokenizer with the family knowledge of `families.py`."""

    def __init__(self, model: nn.Module, tokenizer, family: Family | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.family = family or family_for(model.config.model_type)
        self.layers = self._find_layers()
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ---- structure -------------------------------------------------------------------------
    def _find_layers(self) -> nn.ModuleList:
        for path in self.family.layer_paths:
            try:
                layers = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
        raise UnsupportedArchitectureError(
            f"cannot find the transformer blocks of {type(self.model).__name__} "
            f"(family {self.family.name}); tried {', '.join(self.family.layer_paths)}"
        )

    @property
    def causal(self) -> bool:
        return self.family.causal

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def n_neurons(self) -> int:
        weight = self.out_proj(0).weight
        return weight.shape[0] if self.family.conv1d else weight.shape[1]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (a model spread by a device_map moves each
        block's inputs to that block itself)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def out_proj(self, layer: int) -> nn.Module:
        """The FFN output projection of a block; its input vector holds the neurons."""
        try:
            return self.layers[layer].get_submodule(self.family.out_proj)
        except AttributeError as exc:
            raise UnsupportedArchitectureError(
                f"layer {layer} of {type(self.model).__name__} has no FFN output projection "
                f"{self.family.out_proj!r}"
            ) from exc

    def in_projs(self, layer: int) -> list[nn.Module]:
        return [self.layers[layer].get_submodule(p) for p in self.family.in_projs]

    def mlm_head(self) -> nn.Module:
        """Prediction head of a masked LM, so logits can be computed at the target position only."""
        for name in self.family.mlm_heads:
            if hasattr(self.model, name):
                return getattr(self.model, name)
        raise UnsupportedArchitectureError(f"no masked-LM head ({self.family.mlm_heads}) on {type(self.model).__name__}")

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from final hidden states of chosen positions only (the LM head is the
        costliest matmul of a small multilingual model; running it on every position is waste)."""
        if not self.causal:
            return self.mlm_head()(hidden)
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] at positions[b] of each row: base model once, head on the gathered rows."""
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head_logits(hidden[rows, positions.to(hidden.device)])

    # ---- tokens ----------------------------------------------------------------------------
    @property
    def baseline_token_id(self) -> int:
        """PAD for SAIG baselines: eos for causal models, [MASK] for masked ones (paper Eq. 3)."""
        tok = self.tokenizer.eos_token_id if self.causal else self.tokenizer.mask_token_id
        if tok is None:
            raise ValueError(f"tokenizer of {type(self.model).__name__} has no {'eos' if self.causal else 'mask'} token")
        return int(tok)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # ---- weights used by editing -------------------------------------------------------------
    def output_weight(self, layer: int, neuron: int) -> torch.Tensor:
        """A view of neuron's output vector (its column of down_proj; its row of GPT-2's Conv1D)."""
        weight = self.out_proj(layer).weight
        return weight.data[neuron, :] if self.family.conv1d else weight.data[:, neuron]

    def unembedding(self, token_id: int) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.data[token_id]
