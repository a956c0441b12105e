"""The shard plan: sizes that shrink at the end so the writers finish together, independent of the cluster."""
from __future__ import annotations

import heapq
import subprocess
import sys

import pandas as pd
import pytest

from raypipe.data.shards import plan_shards, shard_sizes
from raypipe.preprocess.config import XrayPreprocessConfig


def _makespan(sizes: list[int], writers: int) -> int:
    """Finish time of greedy list scheduling (a free writer takes the next shard), one time unit per study."""
    free = [0] * writers
    for s in sizes:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


@pytest.mark.parametrize("n, size", [(0, 16), (1, 16), (5, 2), (16, 16), (40, 16), (200, 16), (500, 50), (7, 1)])
def test_sizes_cover_every_study_in_order_and_never_exceed_the_shard_size(n: int, size: int) -> None:
    sizes = shard_sizes(n, size)
    assert sum(sizes) == n and all(1 <= s <= size for s in sizes)
    assert sizes == sorted(sizes, reverse=True)  # full shards first, the small ones last
    left = n
    for s in sizes:  # never more than half of what is left (rounded up)
        assert s <= (left + 1) // 2
        left -= s


def test_large_cohorts_keep_full_shards_and_add_few_small_ones() -> None:
    sizes = shard_sizes(200, 16)
    assert sizes[:11] == [16] * 11 and sizes[11:] == [12, 6, 3, 2, 1]


@pytest.mark.parametrize("writers", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [40, 100, 200, 333])
def test_writers_finish_together(n: int, writers: int) -> None:
    """The last wave idles less than with equal shards; with a full wave of studies every writer ends within half
    a shard of the ideal."""
    equal = [min(16, n - i) for i in range(0, n, 16)]
    shrinking = shard_sizes(n, 16)
    ideal = -(-n // writers)
    assert _makespan(shrinking, writers) <= _makespan(equal, writers)
    if n >= 16 * writers:  # enough studies for a full wave: the tail costs less than half a shard
        assert _makespan(shrinking, writers) - ideal < 16 // 2


def test_plan_names_depend_on_studies_and_config_not_on_the_cluster() -> None:
    table = pd.DataFrame({"study_id": [f"S{i:03d}" for i in range(40)], "patient_id": [f"P{i}" for i in range(40)]})
    cfg = XrayPreprocessConfig(shard_size=16)
    a = plan_shards(table, cfg, lambda r: str(r["study_id"]))
    b = plan_shards(table, cfg, lambda r: str(r["study_id"]))
    assert [p.name for p in a] == [p.name for p in b]
    assert [len(p.rows) for p in a] == shard_sizes(40, 16)
    assert [r["study_id"] for p in a for r in p.rows] == list(table["study_id"])
    other = plan_shards(table, XrayPreprocessConfig(shard_size=16, out_size=128), lambda r: str(r["study_id"]))
    assert {p.name for p in a}.isdisjoint(p.name for p in other)


def test_the_driver_draws_the_contact_sheet_without_matplotlib() -> None:
    """The end of a Ray run (QC collection, contact sheet) is serial: importing matplotlib there cost 1.7 s."""
    code = ("import sys, raypipe.data.shards, raypipe.data.qc_pictures, raypipe.preprocess.contact_sheet; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"the shard runner's driver side imports matplotlib: {out[:200]}"
