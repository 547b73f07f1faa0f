"""Process settings a stage makes for speed must not change what it computes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Allocates and frees `mb` MB, then prints how much of it the process still holds (MB, from statm).
HELD_AFTER_FREE = """
import os, sys
sys.path.insert(0, {repo!r})
from stages.common import keep_freed_memory
kept = keep_freed_memory() if {keep} else False
import numpy as np
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page / 2**20
before = rss()
block = np.ones({mb} * 2**20 // 8)
del block
print(kept, rss() - before)
"""


def held_after_free(keep: bool, mb: int = 200) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", HELD_AFTER_FREE.format(repo=str(REPO), keep=keep, mb=mb)],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_keeps_a_freed_block_mapped_for_reuse():
    kept, held = held_after_free(keep=True)
    assert kept and held > 150  # glibc kept the 200 MB for the next allocation
    assert held_after_free(keep=False)[1] < 50  # by default it hands the block back at once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_keeps_more_than_the_int_maximum():
    """A Direct_FT step frees over 2 GB at once (the tied embedding's gradient temporaries, Adam's);
    a trim threshold of INT_MAX (2 GB) handed that back and the next training faulted it in again."""
    kept, held = held_after_free(keep=True, mb=2560)
    assert kept and held > 2400
