"""Thin DVC stage entry points: read params, call `matrice`, write outputs atomically.

A model stage started as `python -m stages.<name>` runs in a process forked by the warm-start server
when one is up (`stages/warm.py`: torch, transformers and the tokenizer already loaded)."""

from stages.warm import run_stage_warm

run_stage_warm()
