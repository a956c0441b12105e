"""Ray-free predictors over published registry models, shared by batch jobs and the Serve app.

Import the submodules directly (`raypipe.scoring.ct`, `.xray`, `.future`); nothing heavy runs at import.
"""
from __future__ import annotations

from typing import Any

__all__ = ["CTPredictor", "CTPreprocessor", "FutureGenerator", "PVFPredictor", "XrayPredictor", "XrayPreprocessor"]


def __getattr__(name: str) -> Any:
    """Lazy exports so `import raypipe.scoring` does not pull in torch."""
    if name in ("CTPredictor", "CTPreprocessor"):
        from raypipe.scoring import ct

        return getattr(ct, name)
    if name in ("XrayPredictor", "XrayPreprocessor", "PVFPredictor"):
        from raypipe.scoring import xray

        return getattr(xray, name)
    if name == "FutureGenerator":
        from raypipe.scoring.future import FutureGenerator

        return FutureGenerator
    raise AttributeError(name)
