"""Studies/s of `raypipe preprocess ct`: Ray Data on all cores vs one process, one thread each, same studies.

    python bench/bench_preprocess_ct.py --patients 200 [--shard-size 16] [--work DIR]

Both runs preprocess the same synthetic cohort into fresh folders (see `_preprocess_bench`); prints one
JSON figure per line, the ratio last.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import _preprocess_bench as pb

from raypipe.data.ct_pipeline import preprocess_ct
from raypipe.preprocess.config import CTPreprocessConfig


def _make(a: argparse.Namespace) -> tuple[Callable[..., dict[str, Any]], CTPreprocessConfig]:
    """The CT entry point and its config (the default one, shard size optionally overridden)."""
    return preprocess_ct, CTPreprocessConfig(**({"shard_size": a.shard_size} if a.shard_size else {}))


if __name__ == "__main__":
    pb.main("preprocess_ct", "studies/s", "ct", __doc__, 200, _make)
