"""prepare_model: convert the packaged GGUF default to safetensors once; ids/paths are only recorded."""

from __future__ import annotations

from matrice.io import atomic_write_json
from matrice.models.loading import EMBEDDED_GEMMA, ModelConfig, convert_embedded_gemma
from stages.common import load_params, model_arg, model_params, prepared_dir, setup_logging


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    cfg = ModelConfig(name=key, **model_params(load_params(), key))
    out = prepared_dir(key)
    if cfg.source == EMBEDDED_GEMMA:
        convert_embedded_gemma(out)
        load_from = str(out)
    else:  # a Hugging Face id or a local directory: transformers loads it directly, no conversion
        out.mkdir(parents=True, exist_ok=True)
        load_from = cfg.source
    atomic_write_json(out / "source.json", {"source": cfg.source, "load_from": load_from})


if __name__ == "__main__":
    main()
