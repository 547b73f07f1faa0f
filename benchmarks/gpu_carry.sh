#!/usr/bin/env bash
# Packs what a lent GPU machine lacks (it has torch, transformers, accelerate, peft, scipy,
# scikit-learn, pytest and pytest-xdist, and no network) into one folder to name in the device
# call's `carry`: the default model's config and real tokenizer (from prepare_model's folder,
# ~33 MB) and the wheels of the few pure-Python or small packages the checks import.
# Ray (~80 MB) is over one call's 64 MiB and is left out: gpu_check's ray part says so.
set -euo pipefail
carry=${1:-.gpu_carry}
model=models/gemma3_270m
if [ ! -f "$model/config.json" ]; then
  echo "preparing $model (the packaged GGUF, once)"; python -m stages.prepare_model gemma3_270m
fi
rm -rf "$carry"; mkdir -p "$carry/tokenizer" "$carry/whl"
for f in "$model"/*; do
  case "$(basename "$f")" in *.safetensors|source.json) ;; *) cp "$f" "$carry/tokenizer/";; esac
done
# The GPU machine's python is 3.12 on x86-64; versions are the ones this venv installed.
for pkg in opencc captum gguf; do
  version=$(python -c "import importlib.metadata as m; print(m.version('$pkg'))")
  python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/whl" "$pkg==$version"
done
du -sh "$carry" "$carry"/*
