"""Images/s of `raypipe preprocess xray`: Ray Data on all cores vs one process, one thread each, same radiographs.

    python bench/bench_preprocess_xray.py --patients 200 [--shard-size 16] [--variant patches_l1l5] [--work DIR]

Both runs preprocess the same synthetic cohort into fresh folders (see `_preprocess_bench`); prints one
JSON figure per line, the ratio last.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import _preprocess_bench as pb

from raypipe.data.xray_pipeline import preprocess_xray
from raypipe.preprocess.config import XRAY_VARIANTS, XrayPreprocessConfig


def _make(a: argparse.Namespace) -> tuple[Callable[..., dict[str, Any]], XrayPreprocessConfig]:
    """The X-ray entry point and its config (default; variant and shard size optionally overridden)."""
    kw: dict[str, Any] = {"variant": a.variant}
    if a.shard_size:
        kw["shard_size"] = a.shard_size
    return preprocess_xray, XrayPreprocessConfig(**kw)


def _options(ap: argparse.ArgumentParser) -> None:
    """The X-ray-only option."""
    ap.add_argument("--variant", choices=XRAY_VARIANTS, default="patches_l1l5")


if __name__ == "__main__":
    pb.main("preprocess_xray", "images/s", "xray", __doc__, 200, _make, _options)
