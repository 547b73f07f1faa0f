"""Run one stage command under torch's FLOP counter and write the work it did to a JSON file.

    cd <project copy> && python /path/to/benchmarks/count_flops.py OUT.json -m stages.edit gemma3_270m

Why: a stage's wall time says how long it took, not how long it had to take. The FLOPs it executed
(every matmul, forward and backward, as `torch.utils.flop_counter.FlopCounterMode` counts them at the
aten level), divided by the machine's measured matmul rate, is the time the same work needs at the
matmul ceiling: the floor `benchmarks/pipeline.py --work` sets beside each stage's time. The counter
costs time per operator, so the timed run is a separate, uncounted one.

The split: **blocks** is what the transformer blocks computed (FFN and attention projections, and
attention itself where torch has a formula for its kernel); **outside** is everything else: the LM
head, the attribution engine's own head, embeddings and the experiments' extra matmuls.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

# a module path that ends in a numbered child of a block list: Gemma/LLaMA/Qwen `layers.N`,
# GPT-2/BLOOM `h.N`, BERT/XLM-R `layer.N`
BLOCK = re.compile(r"^[^.]+(\.[^.]+)*?\.(layers|h|layer|blocks)\.\d+$")


def split_counts(counts: Mapping[str, Mapping[Any, int]], total: int) -> dict[str, int]:
    """{blocks, outside, total} FLOPs from FlopCounterMode's per-module counts (module paths as keys,
    every ancestor holding its children's counts too): the blocks are the numbered children of the
    model's block list; the rest of the total is outside them."""
    blocks = sum(sum(ops.values()) for name, ops in counts.items() if BLOCK.match(name))
    return {"blocks": int(blocks), "outside": int(total - blocks), "total": int(total)}


def by_operator(counts: Mapping[str, Mapping[Any, int]]) -> dict[str, int]:
    """FLOPs per aten operator over the whole run (the counter's `Global` entry)."""
    return {str(op): int(n) for op, n in counts.get("Global", {}).items()}


@contextmanager
def fresh_memos() -> Iterator[None]:
    """Stored results (matrice.memo: editing passes, injection runs, fact checking's attributions) are
    not read back: each memo folder becomes an empty one of its own for the duration, so the counted
    rerun does all the work the timed run did instead of reading back what that run stored."""
    from matrice.memo import Memo

    original = Memo.__dict__["for_model"]
    with tempfile.TemporaryDirectory(prefix="count-flops-memo-") as scratch:
        def in_scratch(cls: type, directory: str | Path, *args: Any, **kwargs: Any) -> Memo:
            return original.__func__(cls, Path(scratch) / Path(directory).name, *args, **kwargs)

        Memo.for_model = classmethod(in_scratch)
        try:
            yield
        finally:
            Memo.for_model = original


@contextmanager
def released_backward_hooks(counter: Any) -> Iterator[None]:
    """The counter's module tracker keeps a handle to every backward hook it registers until the
    counter exits, and each handle keeps its forward's graph alive: a stage that trains (injection
    deep-copies the model for each of its runs) then holds every copy's parameters and grew past 22 GB
    under the counter. Here the handles are removed when a backward finishes, as the tracker already
    resets its module stack then: the hooks of a graph serve that graph's one backward (a graph
    that is backpropagated twice, or one built while another's backward is pending, would see
    its backward FLOPs counted under Global, not its module)."""
    import torch

    tracker = getattr(counter, "mod_tracker", None)
    if not all(hasattr(tracker, name) for name in ("_maybe_set_engine_callback", "_has_callback", "_hooks")):
        yield  # another torch's tracker: counted as it is
        return
    queue_callback = tracker._maybe_set_engine_callback

    def with_release() -> None:
        if not tracker._has_callback:
            def release() -> None:
                for hook in tracker._hooks:
                    hook.remove()
                tracker._hooks.clear()

            torch.autograd.Variable._execution_engine.queue_callback(release)
        queue_callback()

    tracker._maybe_set_engine_callback = with_release
    try:
        yield
    finally:
        del tracker._maybe_set_engine_callback


def run_counted(module: str, args: list[str]) -> dict[str, Any]:
    """`python -m module *args` in this process under the counter; the stage's exit code is kept."""
    import torch  # noqa: F401  (imported before the counter so its own start-up is not counted as work)
    from torch.utils.flop_counter import FlopCounterMode

    sys.argv = [module, *args]
    sys.path.insert(0, os.getcwd())
    counter = FlopCounterMode(display=False)
    returncode = 0
    start = time.perf_counter()
    with fresh_memos(), counter, released_backward_hooks(counter):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:  # a stage's clear error, or sys.exit(0)
            returncode = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    return {"module": module, "args": args, "returncode": returncode,
            "counted_seconds": round(time.perf_counter() - start, 2),
            "flops": split_counts(counts, total), "by_operator": by_operator(counts)}


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    record = run_counted(argv[2], argv[3:])
    from matrice.io import atomic_write_json  # the project copy is on the path now (run_counted)

    atomic_write_json(Path(argv[0]), record)
    return record["returncode"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
