"""Fine-tuning that changes only knowledge neurons' parameters (paper §IV-H), with Direct_FT and LoRA
beside it.

A neuron n_i^l is unit i of the input of layer l's FFN output projection (docs/method.md §Objects).
Its parameters are

- its *output vector*: column i of the output projection (``down_proj.weight[:, i]``); row i for
  GPT-2's Conv1D ``c_proj`` (weight stored as (in, out));
- its *input rows*: row i of every FFN input projection (gate and up for gated MLPs) and entry i of
  their biases; column i of GPT-2's Conv1D ``c_fc.weight`` (and bias entry i).

The output projection's bias is shared by all neurons and belongs to none.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from matrice.interventions import Pairs, neurons_by_layer
from matrice.models.adapter import Encoded, ModelAdapter

log = logging.getLogger(__name__)


# ---- neuron parameter masks -------------------------------------------------------------------

def ffn_module_names(adapter: ModelAdapter) -> list[str]:
    """Full module names of every layer's FFN input and output projections (LoRA targets)."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    out = []
    for layer in range(adapter.n_layers):
        for m in [*adapter.in_projs(layer), adapter.out_proj(layer)]:
            out.append(names[id(m)])
    return out


def neuron_param_masks(adapter: ModelAdapter, neurons: Pairs) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` of the parameters that belong to ``neurons`` (module docstring).

    Only parameters with at least one masked entry appear. Masks live on the parameter's device.
    """
    names = {id(p): n for n, p in adapter.model.named_parameters()}
    conv1d = adapter.family.conv1d
    masks: dict[str, torch.Tensor] = {}

    def mark(param: nn.Parameter | None, idx: list[int], dim: int) -> None:
        if param is None:
            return
        name = names[id(param)]
        mask = masks.get(name)
        if mask is None:
            mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            masks[name] = mask
        index = torch.tensor(idx, dtype=torch.long, device=param.device)
        mask.index_fill_(dim, index, True)

    for layer, idx in neurons_by_layer(neurons).items():
        for proj in adapter.in_projs(layer):
            mark(proj.weight, idx, 1 if conv1d else 0)  # Conv1D weight is (in, out): neuron = column
            mark(getattr(proj, "bias", None), idx, 0)
        mark(adapter.out_proj(layer).weight, idx, 0 if conv1d else 1)  # Linear (out, in): neuron = column
    return masks


# ---- fine-tuning on answers -------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters. Adam with weight decay fixed at 0, so a parameter whose gradient
    is always zero (masked out) cannot move. ``dropout`` False trains in eval mode (deterministic)."""

    lr: float = 1e-3
    epochs: int = 5
    batch_size: int = 8
    seed: int = 0
    dropout: bool = False
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if not (self.lr > 0) or self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"bad training config: {self}")


def _answer_targets(adapter: ModelAdapter, enc: Encoded) -> tuple[list[int], list[tuple[int, int]]]:
    """Input ids and (logit position, target token) pairs for teacher forcing on the whole answer.

    Causal: input = context + answer; the logit at target_pos + k predicts answer token k.
    Masked: input = the masked cloze (one mask per answer token, contiguous from target_pos);
    the logit at target_pos + k predicts answer token k.
    """
    if adapter.causal:
        ids = list(enc.input_ids) + list(enc.answer_ids)
    else:
        ids = list(enc.input_ids)
    return ids, [(enc.target_pos + k, int(t)) for k, t in enumerate(enc.answer_ids)]


def answer_loss(adapter: ModelAdapter, model: nn.Module, encs: Sequence[Encoded]) -> torch.Tensor:
    """Mean cross-entropy over all answer tokens of the batch (teacher forcing / masked positions).

    The body runs on every real token, the batch's sequences packed into one row where the family
    allows it (else right-padded), and the LM head only on the answer positions (its full-vocabulary
    matmul at every position was most of a step). Why the adapter's body and head and not ``model``:
    a wrapper such as PEFT's injects its layers into the adapter's model in place, so the body already
    carries them, and the head is the adapter's (tied embeddings, soft-capping, MLM transform)."""
    items = [_answer_targets(adapter, e) for e in encs]
    if packs_sequences(adapter):
        selected, tgt = _packed_answer_hidden(adapter, items)
    else:
        selected, tgt = _padded_answer_hidden(adapter, items)
    logits = adapter.head_logits(selected).float()
    return nn.functional.cross_entropy(logits, torch.tensor(tgt, device=logits.device))


# Several sequences in one row, positions restarting at each: transformers builds a causal mask per
# sequence from the position ids (masking_utils), so training computes no padding. Only the model types
# whose packed loss tests/test_injection.py checks against one query at a time; the others pad (BLOOM's
# ALiBi reads the attention mask, masked LMs are bidirectional, the multimodal Gemma 3 is untested).
# The row attends across all of its tokens' pairs, O((Σ length)²): small next to the projections at a
# training batch's 8 short queries.
PACKED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "gemma3_text")
_keeps_apart: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def packs_sequences(adapter: ModelAdapter) -> bool:
    """Whether training packs a batch into one row: a model type above, and (checked once per model)
    its masks keep packed sequences apart with the installed transformers."""
    if not (adapter.causal and getattr(adapter.model.config, "model_type", None) in PACKED_MODEL_TYPES):
        return False
    if adapter.model not in _keeps_apart:
        _keeps_apart[adapter.model] = _packing_keeps_sequences_apart(adapter)
    return _keeps_apart[adapter.model]


def _packing_keeps_sequences_apart(adapter: ModelAdapter) -> bool:
    """Two short sequences packed give what each gives alone (a transformers release whose masks
    ignored the position ids would let the second attend to the first, silently)."""
    sequences = [[5, 6, 7, 8], [9, 10, 11]]
    base = adapter.model.base_model
    training = base.training
    base.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([_packed_body(adapter, [s]) for s in sequences])
            packed = _packed_body(adapter, sequences)
    finally:
        base.train(training)
    apart = bool((packed - alone).abs().max() <= 2e-2 * alone.abs().max())
    if not apart:
        log.warning("this transformers version does not keep packed sequences apart for %s: training pads",
                    adapter.model.config.model_type)
    return apart


def _packed_answer_hidden(adapter: ModelAdapter, items: Sequence[tuple[list[int], list[tuple[int, int]]]]
                          ) -> tuple[torch.Tensor, list[int]]:
    """The body's output at every answer position and its target, the sequences packed into one row
    (positions restart at each, so each attends to itself only): no padding is computed."""
    at, tgt, offset = [], [], 0
    for seq, targets in items:
        at += [offset + p for p, _ in targets]
        tgt += [t for _, t in targets]
        offset += len(seq)
    hidden = _packed_body(adapter, [seq for seq, _ in items])
    return hidden[torch.tensor(at, device=hidden.device)], tgt


def _packed_body(adapter: ModelAdapter, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """The body's output [Σ length, d] for ``sequences`` run as one row, positions restarting at each."""
    ids = [t for seq in sequences for t in seq]
    positions = [p for seq in sequences for p in range(len(seq))]
    device = adapter.device
    return adapter.model.base_model(input_ids=torch.tensor([ids], device=device),
                                    position_ids=torch.tensor([positions], device=device), use_cache=False)[0][0]


def _padded_answer_hidden(adapter: ModelAdapter, items: Sequence[tuple[list[int], list[tuple[int, int]]]]
                          ) -> tuple[torch.Tensor, list[int]]:
    """:func:`_packed_answer_hidden` for families that cannot pack: right-padded rows."""
    width = max(len(ids) for ids, _ in items)
    device = adapter.device
    input_ids = torch.full((len(items), width), adapter.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    rows, pos, tgt = [], [], []
    for r, (ids, targets) in enumerate(items):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
        for p, t in targets:
            rows.append(r), pos.append(p), tgt.append(t)
    hidden = adapter.model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device))[0]
    return hidden[torch.tensor(rows, device=hidden.device), torch.tensor(pos, device=hidden.device)], tgt


def answer_loss_reference(model: nn.Module, adapter: ModelAdapter, encs: Sequence[Encoded]) -> torch.Tensor:
    """:func:`answer_loss` the obvious way (the model's own logits at every position), for tests."""
    losses = []
    for enc in encs:
        ids, targets = _answer_targets(adapter, enc)
        logits = model(input_ids=torch.tensor([ids], device=adapter.device)).logits[0].float()
        losses += [nn.functional.cross_entropy(logits[p][None], torch.tensor([t], device=logits.device), reduction="sum")
                   for p, t in targets]
    return torch.stack(losses).sum() / len(losses)


def train_on_answers(
    adapter: ModelAdapter,
    encs: Sequence[Encoded],
    params: Sequence[nn.Parameter],
    cfg: TrainConfig,
    model: nn.Module | None = None,
    desc: str = "fine-tuning",
    progress: bool = True,
) -> list[float]:
    """Adam on ``params`` (the caller sets requires_grad and any gradient masks); returns the mean
    loss of each epoch. ``model`` is what is called (e.g. a PEFT wrapper); default the adapter's."""
    model = model or adapter.model
    params = [p for p in params if p.requires_grad]
    if not params or not encs or cfg.epochs == 0:
        return []
    torch.manual_seed(cfg.seed)
    order_rng = random.Random(cfg.seed)
    # fused: one kernel per step instead of a dozen element-wise passes over every trained tensor
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0, fused=_fused_adam_supported(params))
    model.train(cfg.dropout)
    losses = []
    try:
        bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=not progress)
        for _ in bar:
            order = list(range(len(encs)))
            order_rng.shuffle(order)
            total, n = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                batch = [encs[i] for i in order[start : start + cfg.batch_size]]
                opt.zero_grad(set_to_none=False)  # keep the gradient buffers: no re-allocation per step
                with torch.enable_grad():
                    loss = answer_loss(adapter, model, batch)
                    loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                total += float(loss.detach()) * len(batch)
                n += len(batch)
            losses.append(total / n)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if not math.isfinite(losses[-1]):
                log.warning("%s: loss is %s; stopping", desc, losses[-1])
                break
    finally:
        model.eval()
    return losses


def _fused_adam_supported(params: Sequence[nn.Parameter]) -> bool:
    """Fused Adam takes floating-point tensors on CPU or CUDA, all on one device type."""
    types = {p.device.type for p in params}
    return len(types) == 1 and types <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def enable_masked_training(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> tuple[list[nn.Parameter], list]:
    """Freeze everything except the masked parameters, whose gradients are multiplied by their
    mask. Returns the trainable parameters and the hook handles (remove them when done)."""
    params = dict(model.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise KeyError(f"mask names not parameters of the model: {missing[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable, handles = [], []
    for name, mask in masks.items():
        p = params[name]
        p.requires_grad_(True)
        m = mask.to(device=p.device, dtype=p.dtype)
        handles.append(p.register_hook(lambda g, m=m: g * m))
        trainable.append(p)
    return trainable, handles


def check_masked_update(original: nn.Module, trained: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Every parameter entry outside the masks is bit-identical between the two models, else raise."""
    orig = dict(original.named_parameters())
    for name, p in trained.named_parameters():
        o = orig[name]
        mask = masks.get(name)
        if mask is None:
            same = torch.equal(p.detach(), o.detach().to(p.device))
        else:
            keep = ~mask.to(p.device)
            same = torch.equal(p.detach()[keep], o.detach().to(p.device)[keep])
        if not same:
            raise RuntimeError(f"masked fine-tuning changed parameter {name!r} outside the neuron mask")


# ---- neuron-masked LoRA (MEMLA-style) -----------------------------------------------------------

MASKED_LORA_SUFFIX = "_lora"  # "matrice_lora": LoRA confined to MATRICE's neurons


def masked_lora(model: nn.Module, adapter: ModelAdapter, neurons: Pairs, r: int, alpha: int, conv1d: bool,
                seed: int) -> tuple[nn.Module, list[nn.Parameter], list]:
    """LoRA on the FFN projections of the neurons' layers whose update ΔW = B·A is confined to the
    neurons: in an input projection the neuron is an output feature, so B's other rows are held at 0
    (B starts at 0, their gradients are masked); in the output projection the neuron is an input
    feature, so A's other columns are zeroed and masked. The merged ΔW is then 0 outside the neurons'
    rows/columns, as in masked fine-tuning. Returns (the PEFT model, trainable parameters, hook handles)."""
    from peft import LoraConfig, get_peft_model

    by_layer = neurons_by_layer(neurons)
    names = {id(m): n for n, m in model.named_modules()}
    targets = [names[id(m)] for layer in by_layer for m in [*adapter.in_projs(layer), adapter.out_proj(layer)]]
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                                  target_modules=targets, fan_in_fan_out=conv1d))
    handles = []
    for layer, idx in by_layer.items():
        for proj in adapter.in_projs(layer):
            handles.append(_confine(proj.lora_B["default"].weight, idx, dim=0))  # [out = neurons, r]
        handles.append(_confine(adapter.out_proj(layer).lora_A["default"].weight, idx, dim=1))  # [r, in = neurons]
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad], handles


def _confine(weight: nn.Parameter, idx: list[int], dim: int) -> Any:
    """Zero ``weight`` outside ``idx`` along ``dim`` and keep it there (gradient mask)."""
    keep = torch.zeros(weight.shape[dim], dtype=weight.dtype, device=weight.device)
    keep[torch.tensor(idx, device=weight.device)] = 1
    keep = keep.view(-1, 1) if dim == 0 else keep.view(1, -1)
    with torch.no_grad():
        weight.mul_(keep)
    return weight.register_hook(lambda g: g * keep)


# ---- one variant of the injection experiment ---------------------------------------------------

class VariantSettings(Protocol):
    """What :func:`train_variant` reads (the injection experiment's config has it)."""

    seed: int
    lora_r: int
    lora_alpha: int
    verify: bool

    def train_config(self, lr: float, seed: int | None = None) -> TrainConfig: ...


def train_variant(adapter: ModelAdapter, variant: str, pairs: np.ndarray | None, encs_new: Sequence[Encoded],
                  cfg: VariantSettings, lr: float, progress: bool = True, seed: int | None = None
                  ) -> tuple[ModelAdapter, dict[str, Any]]:
    """Fine-tune a deep copy of the caller's model as ``variant`` ("direct_ft", "lora", "<method>_lora":
    LoRA confined to ``pairs``, or masked fine-tuning on ``pairs``) on ``encs_new`` with training seed ``seed`` (the config's when None: batch order, LoRA's
    start); returns an adapter around the trained copy and {n_trainable, n_neurons, losses, lr}. The
    caller's model is not touched."""
    model = copy.deepcopy(adapter.model)
    work = ModelAdapter(model, adapter.tokenizer, adapter.family)  # freezes every parameter
    info: dict[str, Any] = {"n_neurons": None if pairs is None else int(len(pairs))}
    tcfg = cfg.train_config(lr, seed)
    info["lr"] = tcfg.lr
    if variant == "direct_ft":
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
        info["n_trainable"] = int(sum(p.numel() for p in params))
        info["losses"] = train_on_answers(work, encs_new, params, tcfg, desc=variant, progress=progress)
    elif variant.endswith(MASKED_LORA_SUFFIX):
        peft_model, params, handles = masked_lora(model, work, pairs, cfg.lora_r, cfg.lora_alpha, adapter.family.conv1d,
                                                  tcfg.seed)
        info["n_trainable"] = int(sum(p.numel() for p in params))
        try:
            info["losses"] = train_on_answers(work, encs_new, params, tcfg, model=peft_model, desc=variant,
                                              progress=progress)
        finally:
            for h in handles:
                h.remove()
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=ffn_module_names(work), fan_in_fan_out=adapter.family.conv1d)
        torch.manual_seed(tcfg.seed)  # LoRA's A matrices: a seeded start, whatever ran before
        peft_model = get_peft_model(model, lcfg)  # injects LoRA layers into `model` in place
        params = [p for p in peft_model.parameters() if p.requires_grad]
        info["n_trainable"] = int(sum(p.numel() for p in params))
        info["losses"] = train_on_answers(work, encs_new, params, tcfg, model=peft_model, desc=variant, progress=progress)
    else:
        masks = neuron_param_masks(work, pairs)
        params, handles = enable_masked_training(model, masks)
        info["n_trainable"] = int(sum(int(m.sum()) for m in masks.values()))
        try:
            info["losses"] = train_on_answers(work, encs_new, params, tcfg, desc=variant, progress=progress)
        finally:
            for h in handles:
                h.remove()
        if cfg.verify:
            check_masked_update(adapter.model, model, masks)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return work, info
