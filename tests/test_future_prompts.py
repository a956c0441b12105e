"""The HTTP generation job's prompts carry the clinical attributes exactly when the model was trained with them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _diffx_data import save_diffx_dir

CLINICAL = {"age": 70, "sex": "F", "bmi": 22.5, "glucocorticoid": 1, "prior_fracture": 0, "smoker": 1}


@pytest.mark.parametrize("trained_with_clinical", [True, False])
def test_generation_prompt_repeats_the_training_prompt(tmp_path: Path, trained_with_clinical: bool) -> None:
    from raypipe.models.registry import build_model
    from raypipe.registry import publish
    from raypipe.scoring.future import FutureGenerator

    torch.manual_seed(0)
    run = save_diffx_dir(build_model("diffx_tiny").eval(), tmp_path / "run", sampler={"steps": 2, "eta": 0.0})
    meta = json.loads((run / "model_meta.json").read_text())
    meta["clinical_prompts"] = trained_with_clinical  # what `raypipe train ldm` records from its config
    (run / "model_meta.json").write_text(json.dumps(meta))
    publish(run, tmp_path / "registry", "ldm")
    gen = FutureGenerator.from_registry(tmp_path / "registry", "ldm")
    pixels = np.random.default_rng(0).random((40, 24)).astype(np.float32)
    images = gen.generate(pixels, 70, "F", [1, 5], [0], clinical=CLINICAL)
    prompts = {g.year: g.prompt for g in images}
    if trained_with_clinical:
        assert prompts == {1.0: "An image of 71 years old female, BMI 22.5, with glucocorticoid use",
                           5.0: "An image of 75 years old female, BMI 22.5, with glucocorticoid use"}
    else:
        assert prompts == {1.0: "An image of 71 years old female", 5.0: "An image of 75 years old female"}
    for g in images:  # cut back to ldm_input's content box: the source's aspect at the model's resolution
        h, w = g.pixels.shape
        assert abs(h / w - pixels.shape[0] / pixels.shape[1]) < 2 / min(h, w), (g.pixels.shape, pixels.shape)
