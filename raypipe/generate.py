"""`raypipe generate`: Diff-X future radiographs (papers/004) and their pVF scores.

The pipeline, written out as a diffusers-style sampler (models in `raypipe.models.ldm`, schedulers in
`raypipe.models.ldm.schedule`, this file only the loop):

1. encode the baseline radiograph with the VAE and take its low-resolution copy;
2. DDIM inversion of the latent through the structure LDM, conditioned on the baseline prompt
   ("An image of {age} years old {sex}") and the low-res image: x_0 -> x_T;
3. from x_T, two trajectories in lockstep at every DDIM timestep: the structure LDM re-traces the
   baseline (deterministic DDIM, eta = 0) and its decoder ResNet output and self-attention
   queries/keys at the injection layer (`raypipe.models.ldm.diffx`, the thesis's fifth decoder block)
   replace the prompt LDM's, which denoises all future prompts (age + 1, 5, 10 years and the last
   follow-up when given) x seeds as one batch;
4. decode, write one PNG per (year, seed) and ``generation.json``.

Where the seed enters: inversion is deterministic, so with deterministic DDIM all seeds would give
the same image. The thesis draws 10 seeds per time point without saying where they act; here the
seed drives the stochastic term of DDIM (``eta``, default 0.5) in the prompt LDM's denoising only,
one `torch.Generator` per sample on the model's device (noise is drawn where it is used, no host copy per
step), so a sample depends on its seed, not on its place in the batch. The same seeds give the same images
on the same kind of device; CPU and CUDA generators draw different streams.

Cost per patient: the inversion (``steps`` structure-LDM passes on the baseline image) and the structure
trajectory (``steps`` more) run at batch 1 once per patient and are shared by every seed and year (features
are broadcast into the prompt LDM's batch); the last inversion is kept, so a second call on the same image
(e.g. `reconstruction_quality` after `generate_study`) does not redo it. The prompt LDM denoises all
years x seeds as one batch (``max_batch`` per pass). `DiffXPipeline.generate_many` runs several patients
(Serve's batched requests) through one inversion, one structure trajectory and one prompt batch per step;
the injection gives each sample its own patient's features.

Precision: bf16 autocast on CUDA by default (`pipeline_from_dir(bf16=None)`: the CLI, the batch job and
Serve), fp32 on CPU; ``bf16=False`` forces fp32 on a GPU.

Solver steps: ``steps`` (sampler setting in model_meta.json, `raypipe generate --steps`, the batch job's
``steps``) sets both the DDIM inversion and the denoising step count (they must match so denoising starts
where inversion ended). The thesis does not state a step count; the default 50 is Plug-and-Play's sampling
count. `steps_agreement` is the quality check for fewer steps (MS-SSIM of the same seeds at two step
counts; `bench/bench_generate.py --compare-steps 20,50` reports it).
`DiffXPipeline.sample_single` is the comparison sampler of the thesis's Figure 9/10: the prompt LDM
alone from seeded Gaussian noise, no inversion, no injection.

Scores (thesis Methods 7): BpVF = pVF of the baseline radiograph; per year the GpVF mean and SD
over seeds; the image's GpVF = the seed mean of the 10-year image ("the generative pVF score was set as
10-year fracture score"; `gpvf_rule: horizon_mean`, `gpvf_horizon_years: 10`), uncertainty = the SD over
seeds at that year. `gpvf_rule: max_over_years` (the maximum over years of the seed means) is kept as a
named option. When the horizon year was not generated (an HTTP request for 1 and 5 years) the latest
generated year stands in and `gpvf_year` says so; the cohort job requires the horizon year. Risk group
LL / LH / HIGH by `raypipe.metrics.risk_groups` (BpVF >= 0.5 HIGH, else GpVF >= 0.6 LH, else LL). The
per-participant maximum over baseline images is taken by the cohort job
(`raypipe.data.generate_pipeline.aggregate_participants`).

Geometry: BpVF and GpVF are scored on the same geometry. A generated 512 x 512 image is cut back to the
box the radiograph occupies in `ldm_input`'s padded square (`raypipe.preprocess.pvf.crop_ldm_content`)
before `pvf_input` fits it to 1024 x 512 exactly as it fits the baseline; written PNGs are that content.

Prompts: the generation prompt carries the clinical attributes the model was trained with
(`clinical_prompts` in model_meta.json, written by `raypipe train ldm`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raypipe.models.ldm.diffx import DEFAULT_INJECTION_LAYER, PlugAndPlay
from raypipe.models.ldm.model import DiffXModel
from raypipe.models.ldm.schedule import ddim_inverse_scheduler, ddim_scheduler
from raypipe.models.ldm.text import build_prompt

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_YEARS",
    "DiffXPipeline",
    "SamplerSettings",
    "aggregate_scores",
    "autocast_dtype",
    "future_prompts",
    "generate",
    "generate_cli",
    "generate_study",
    "load_diffx",
    "steps_agreement",
]

DEFAULT_YEARS: tuple[float, ...] = (1.0, 5.0, 10.0)
DEFAULT_SEEDS = 10
CLINICAL_PROMPT_KEYS = ("bmi", "prevalent_fracture", "glucocorticoid", "prior_fracture", "rheumatoid_arthritis",
                        "secondary_osteoporosis")


@dataclass(frozen=True)
class SamplerSettings:
    """Sampling settings (stored in model_meta.json by `raypipe train ldm`, overridable per call)."""

    steps: int = 50
    eta: float = 0.5
    guidance_scale: float = 1.0
    injection_layer: int = DEFAULT_INJECTION_LAYER
    resnet_fraction: float = 1.0  # inject ResNet features during the first fraction of the steps (thesis: all)
    attention_fraction: float = 1.0  # same for self-attention queries/keys
    max_batch: int = 64  # prompt-LDM samples per forward pass (the structure LDM runs once per step)
    low_threshold: float = 0.5
    high_threshold: float = 0.6
    gpvf_rule: str = "horizon_mean"  # horizon_mean (thesis: seed mean of the 10-year image) | max_over_years
    gpvf_horizon_years: float = 10.0

    def replace(self, **kw: Any) -> "SamplerSettings":
        """A copy with the non-None keyword values replaced."""
        from dataclasses import replace

        return replace(self, **{k: v for k, v in kw.items() if v is not None})


# ---------------------------------------------------------------------------------------------- pipeline
class DiffXPipeline:
    """Diff-X sampler over a `DiffXModel`: DDIM inversion + plug-and-play injected denoising."""

    def __init__(self, model: DiffXModel, settings: SamplerSettings | None = None, amp_dtype: torch.dtype | None = None,
                 clinical_prompts: bool = False) -> None:
        self.model = model.eval()
        self.clinical_prompts = clinical_prompts  # prompts carry the clinical attributes the model was trained with
        self.settings = settings or SamplerSettings()
        self.amp_dtype = amp_dtype
        self.scheduler = ddim_scheduler()
        self.inverse_scheduler = ddim_inverse_scheduler()
        layer = self.settings.injection_layer
        self.injection = PlugAndPlay(model.structure_unet, model.prompt_unet, (layer,), (layer,))
        self.on_step: Callable[[str], None] | None = None  # called after every inversion/denoising step
        self._inversion: tuple[tuple[Any, ...], tuple[Tensor, Tensor, Tensor]] | None = None

    def _step_done(self, phase: str) -> None:
        if self.on_step is not None:
            self.on_step(phase)

    def steps_per_call(self) -> int:
        """DDIM steps one `__call__` runs (inversion + denoising), for progress bars."""
        return 2 * int(self.settings.steps)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def generators(self, seeds: Sequence[int], offset: int = 0) -> list[torch.Generator]:
        """One generator per sample on the model's device, seeded with seed + offset."""
        return [torch.Generator(device=self.device).manual_seed(int(s) + offset) for s in seeds]

    def noise(self, shape: Sequence[int], generators: Sequence[torch.Generator]) -> Tensor:
        """One standard-normal tensor per generator, drawn on the model's device (no host-to-device copy)."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device) for g in generators])

    def _prompt_eps(self, latents: Tensor, t: Tensor, text: Tensor, uncond: Tensor | None) -> Tensor:
        """Prompt-LDM noise prediction, with classifier-free guidance when `uncond` is given."""
        m, g = self.model, self.settings.guidance_scale
        if uncond is None:
            return m.prompt_eps(latents, t, text).float()
        both = m.prompt_eps(torch.cat([latents, latents]), t, torch.cat([uncond.expand_as(text), text])).float()
        e_u, e_c = both.chunk(2)
        return e_u + g * (e_c - e_u)

    @torch.no_grad()
    def invert(self, image: Tensor, prompt: str | Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """DDIM inversion through the structure LDM: returns (x_T, low-res image, prompt embedding).

        `image` may hold several baseline images (N, 1, H, W), each with its own prompt (a list of N).
        The last result is kept and returned again for the same images, prompts and settings.
        """
        m = self.model
        image = image.to(self.device, torch.float32)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        key = (_tensor_digest(image), tuple(prompts), int(self.settings.steps), str(self.amp_dtype))
        if self._inversion is not None and self._inversion[0] == key:
            return self._inversion[1]
        with self._autocast():
            lowres = m.lowres(image)
            text = m.encode_text(prompts)
            z = m.encode(image).float()
            self.inverse_scheduler.set_timesteps(self.settings.steps, device=self.device)
            for t in self.inverse_scheduler.timesteps:
                eps = m.structure_eps(z, t, text, lowres).float()
                z = self.inverse_scheduler.step(eps, t, z).prev_sample
                self._step_done("invert")
        self._inversion = (key, (z, lowres, text))
        return z, lowres, text

    def forget_inversion(self) -> None:
        """Drop the kept inversion (benchmarks timing a patient from scratch)."""
        self._inversion = None

    @torch.no_grad()
    def __call__(self, image: Tensor, baseline_prompt: str, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """Diff-X images (len(prompts), len(seeds), 1, H, W) in [-1, 1] from one baseline image (1, 1, H, W)."""
        return self.generate_many(image, [baseline_prompt], [prompts], [seeds])[0]

    @torch.no_grad()
    def generate_many(self, images: Tensor, baseline_prompts: Sequence[str], prompts: Sequence[Sequence[str]],
                      seeds: Sequence[Sequence[int]]) -> list[Tensor]:
        """Diff-X for several baseline images at once: per image r, (len(prompts[r]), len(seeds[r]), 1, H, W).

        One structure forward over all N images and one prompt forward over all their (prompt, seed)
        samples per step (chunked by `max_batch`); the injection picks each sample's own image's
        features. Noise is drawn per sample from its seed, so a request's images do not depend on
        which other requests share the batch.
        """
        m, s = self.model, self.settings
        n = images.shape[0]
        if not (len(baseline_prompts) == len(prompts) == len(seeds) == n):
            raise ValueError(f"{n} images need as many baseline prompts, prompt lists and seed lists")
        x_t, lowres, text_s = self.invert(images, list(baseline_prompts))
        flat = [p for r in range(n) for p in prompts[r]]
        first = np.cumsum([0] + [len(p) for p in prompts])
        pairs = [(r, i, j) for r in range(n) for i in range(len(prompts[r])) for j in range(len(seeds[r]))]
        with self._autocast():
            text_p = m.encode_text(flat)
            uncond = m.encode_text([""]) if s.guidance_scale != 1.0 else None
        text_rows = torch.tensor([int(first[r]) + i for r, i, _ in pairs], device=text_p.device)
        owner = torch.tensor([r for r, _, _ in pairs], device=self.device)
        z_s = x_t
        z_p = x_t.index_select(0, owner).clone()
        gens = self.generators([int(seeds[r][j]) for r, _, j in pairs])
        self.scheduler.set_timesteps(s.steps, device=self.device)
        steps = len(self.scheduler.timesteps)
        self.injection.reset()
        try:
            for k, t in enumerate(self.scheduler.timesteps):
                self.injection.enabled = True
                self.injection.inject_resnet = k < s.resnet_fraction * steps
                self.injection.inject_attention = k < s.attention_fraction * steps
                with self._autocast():
                    eps_s = m.structure_eps(z_s, t, text_s, lowres).float()  # records the features
                    chunks = []
                    for c in range(0, len(pairs), s.max_batch):
                        self.injection.owner = owner[c:c + s.max_batch]
                        chunks.append(self._prompt_eps(z_p[c:c + s.max_batch], t,
                                                       text_p.index_select(0, text_rows[c:c + s.max_batch]), uncond))
                    eps_p = torch.cat(chunks)  # injects them
                self.injection.enabled = False
                z_s = self.scheduler.step(eps_s, t, z_s, eta=0.0).prev_sample
                noise = self.noise(z_p.shape[1:], gens)
                z_p = self.scheduler.step(eps_p, t, z_p, eta=s.eta, variance_noise=noise).prev_sample
                self._step_done("denoise")
        finally:
            self.injection.enabled = False
            self.injection.owner = None
        decoded = self._decode(z_p)
        out, start = [], 0
        for r in range(n):
            size = len(prompts[r]) * len(seeds[r])
            out.append(decoded[start:start + size].reshape(len(prompts[r]), len(seeds[r]), *images.shape[1:]))
            start += size
        return out

    @torch.no_grad()
    def sample_single(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """Single-LDM comparison: prompt LDM from seeded noise, no inversion and no injection."""
        m, s = self.model, self.settings
        pairs = [(i, j) for i in range(len(prompts)) for j in range(len(seeds))]
        shape = (m.latent_channels, m.latent_size, m.latent_size)
        pair_seeds = [int(seeds[j]) for _, j in pairs]
        z = self.noise(shape, self.generators(pair_seeds)) * self.scheduler.init_noise_sigma
        gens = self.generators(pair_seeds, offset=1_000_003)
        with self._autocast():
            text = m.encode_text([prompts[i] for i, _ in pairs])
            uncond = m.encode_text([""]) if s.guidance_scale != 1.0 else None
        self.scheduler.set_timesteps(s.steps, device=self.device)
        for t in self.scheduler.timesteps:
            with self._autocast():
                eps = torch.cat([self._prompt_eps(z[c:c + s.max_batch], t, text[c:c + s.max_batch], uncond)
                                 for c in range(0, len(pairs), s.max_batch)])
            z = self.scheduler.step(eps, t, z, eta=s.eta, variance_noise=self.noise(shape, gens)).prev_sample
        return self._decode(z).reshape(len(prompts), len(seeds), 1, m.image_size, m.image_size)

    def _decode(self, latents: Tensor) -> Tensor:
        """VAE decode in chunks, clamped to [-1, 1], float32 on CPU."""
        out = []
        with self._autocast():
            for c in range(0, latents.shape[0], self.settings.max_batch):
                out.append(self.model.decode(latents[c:c + self.settings.max_batch]).float().clamp(-1, 1).cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------- loading
def load_diffx(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[DiffXModel, dict[str, Any]]:
    """A `DiffXModel` from a `raypipe train ldm` folder or a registry version (model.pt + model_meta.json)."""
    from raypipe.models.registry import build_model

    from raypipe import storage
    from raypipe.artifact import read_artifact

    where = storage.absolute(model_dir)
    with storage.localize_files(where, ("model.pt", "model_meta.json")) as local:
        d = Path(local)
        if not (d / "model_meta.json").is_file() or not (d / "model.pt").is_file():
            from raypipe.io.errors import RaypipeInputError

            raise RaypipeInputError("not a Diff-X model folder (needs model.pt and model_meta.json)", path=where)
        art = read_artifact(str(d))
        meta = art.as_dict()
        with storage.localize_files(where, art.files) as carried:  # e.g. the tokenizer of an SD fine-tune
            model = build_model(art.builder, **art.inference_kwargs(carried))
        if not isinstance(model, DiffXModel):
            raise TypeError(f"{where}: builder {art.builder!r} is not a Diff-X model")
        model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta


def _tensor_digest(t: Tensor) -> str:
    """Content hash of a tensor (shape, dtype and bytes), to recognise the same baseline image."""
    import hashlib

    data = t.detach().contiguous().cpu()
    h = hashlib.blake2b(f"{tuple(data.shape)}{data.dtype}".encode(), digest_size=16)
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def autocast_dtype(device: torch.device, bf16: bool | None = None) -> torch.dtype | None:
    """The sampler's autocast dtype: bf16 on CUDA unless `bf16` is False; None (fp32) on CPU or when asked."""
    if device.type != "cuda":
        return None
    return None if bf16 is False else torch.bfloat16


def pipeline_from_dir(model_dir: str | Path, device: str | torch.device | None = None, bf16: bool | None = None,
                      **overrides: Any) -> DiffXPipeline:
    """`DiffXPipeline` with the sampler settings saved beside the weights (overridden by keyword).

    `bf16`: None (default) = bf16 autocast on a GPU, fp32 on CPU; False = fp32 everywhere.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_diffx(model_dir, dev)
    known = SamplerSettings.__dataclass_fields__
    settings = SamplerSettings(**{k: v for k, v in meta.get("sampler", {}).items() if k in known}).replace(**overrides)
    return DiffXPipeline(model, settings, amp_dtype=autocast_dtype(dev, bf16),
                         clinical_prompts=bool(meta.get("clinical_prompts", False)))


# ---------------------------------------------------------------------------------------------- scores
GPVF_RULES = ("horizon_mean", "max_over_years")


def aggregate_scores(
    bpvf: float | None,
    gpvf: Mapping[float, Sequence[float]],
    low: float = 0.5,
    high: float = 0.6,
    *,
    rule: str = "horizon_mean",
    horizon_years: float = 10.0,
) -> dict[str, Any]:
    """Thesis aggregation of one image: per-year seed mean/SD, GpVF by `rule`, LL/LH/HIGH group by thresholds.

    ``horizon_mean`` (thesis): GpVF = seed mean at `horizon_years` (the latest generated year when that one
    is absent; ``gpvf_year`` records which). ``max_over_years``: the maximum of the seed means (ties go to the
    earliest year). SD is the sample SD (ddof = 1; 0 with one seed).
    """
    from raypipe.metrics import risk_groups

    if rule not in GPVF_RULES:
        raise ValueError(f"gpvf_rule must be one of {GPVF_RULES}, got {rule!r}")
    per_year: dict[str, dict[str, Any]] = {}
    means: list[tuple[float, float, float]] = []  # (year, mean, sd)
    for year in sorted(gpvf):
        scores = np.asarray(gpvf[year], dtype=np.float64)
        if scores.size == 0:
            raise ValueError(f"no GpVF scores for year {year}")
        mean = float(scores.mean())
        sd = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
        per_year[f"{float(year):g}"] = {"mean": mean, "sd": sd, "scores": scores.tolist()}
        means.append((float(year), mean, sd))
    best_year, best_mean, best_sd = None, float("nan"), float("nan")
    if means and rule == "max_over_years":
        top = max(m for _, m, _ in means)
        best_year, best_mean, best_sd = next(x for x in means if x[1] >= top - 1e-9)  # earliest of (near-)ties
    elif means:
        at = [x for x in means if abs(x[0] - float(horizon_years)) < 1e-9]
        best_year, best_mean, best_sd = at[0] if at else means[-1]
    out: dict[str, Any] = {"bpvf": None if bpvf is None else float(bpvf), "gpvf_by_year": per_year,
                           "gpvf": best_mean if per_year else None, "gpvf_year": best_year,
                           "gpvf_rule": rule, "uncertainty": best_sd if per_year else None,
                           "thresholds": {"low": low, "high": high}, "group": None}
    if bpvf is not None and per_year:
        out["group"] = str(risk_groups([bpvf], [best_mean], low=low, high=high)[0])
    return out


def future_prompts(age: float, sex: str, years: Sequence[float], clinical: Mapping[str, Any] | None = None
                   ) -> tuple[str, dict[float, str]]:
    """Baseline prompt and one prompt per future year (age + years; clinical attributes unchanged)."""
    attrs = {k: v for k, v in (clinical or {}).items() if k in CLINICAL_PROMPT_KEYS}
    return build_prompt(age, sex, **attrs), {float(y): build_prompt(float(age) + float(y), sex, **attrs) for y in years}


# ---------------------------------------------------------------------------------------------- one study
def generate_study(
    pipeline: DiffXPipeline,
    pixels: np.ndarray,
    age: float,
    sex: str,
    years: Sequence[float],
    seeds: Sequence[int],
    out_dir: str | Path | None,
    pvf: Any = None,
    clinical: Mapping[str, Any] | None = None,
    write_images: bool = True,
    age_model: Any = None,
) -> dict[str, Any]:
    """Generate one patient's future images; write PNGs + generation.json into `out_dir` (when given).

    With `age_model` (`raypipe.scoring.pvf.AgeScorer`) every generated image also gets its predicted age:
    ``age_check`` = {year: {"prompt_age", "predicted": [per seed]}} (the thesis's age check, Methods 8).
    """
    from raypipe.io.radiograph import write_radiograph_png
    from raypipe.preprocess.pvf import crop_ldm_content, from_ldm_output, ldm_input

    years = [float(y) for y in years]
    if not years:
        raise ValueError("need at least one future time point")
    seeds = [int(s) for s in seeds]
    base_prompt, prompts = future_prompts(age, sex, years, clinical if pipeline.clinical_prompts else None)
    image = torch.from_numpy(ldm_input(pixels, pipeline.model.image_size))[None]
    images = pipeline(image, base_prompt, [prompts[y] for y in years], seeds)
    square = from_ldm_output(images[:, :, 0].numpy())  # (years, seeds, S, S) in [0, 1]
    # back to the baseline's geometry (no padding bars): GpVF is scored as BpVF is
    grey = [[crop_ldm_content(square[i, j], np.shape(pixels)) for j in range(len(seeds))] for i in range(len(years))]

    from raypipe import storage

    out = storage.absolute(out_dir) if out_dir is not None else None
    files: dict[str, list[str]] = {}
    if out is not None and write_images:
        for i, y in enumerate(years):
            files[f"{y:g}"] = []
            for j, sd in enumerate(seeds):
                name = f"year{y:g}_seed{sd}.png"
                write_radiograph_png(storage.join(out, name), grey[i][j], bits=8)
                files[f"{y:g}"].append(name)
    s = pipeline.settings
    record: dict[str, Any] = {
        "age": float(age), "sex": str(sex), "years": years, "seeds": seeds,
        "baseline_prompt": base_prompt, "prompts": {f"{y:g}": prompts[y] for y in years}, "images": files,
        "sampler": {"steps": s.steps, "eta": s.eta, "guidance_scale": s.guidance_scale,
                    "injection_layer": s.injection_layer, "image_size": pipeline.model.image_size},
        "clinical_prompts": pipeline.clinical_prompts, "gpvf_geometry": "ldm content box, as the baseline",
    }
    if pvf is not None:
        bpvf = float(pvf([np.asarray(pixels, dtype=np.float32)])[0])
        flat = pvf([grey[i][j] for i in range(len(years)) for j in range(len(seeds))]).reshape(len(years), len(seeds))
        record.update(aggregate_scores(bpvf, {y: flat[i] for i, y in enumerate(years)}, s.low_threshold,
                                       s.high_threshold, rule=s.gpvf_rule, horizon_years=s.gpvf_horizon_years))
    if age_model is not None:
        flat_age = age_model([grey[i][j] for i in range(len(years)) for j in range(len(seeds))])
        record["age_check"] = {f"{y:g}": {"prompt_age": float(age) + y,
                                         "predicted": flat_age[i * len(seeds):(i + 1) * len(seeds)].tolist()}
                               for i, y in enumerate(years)}
    if out is not None:
        storage.makedirs(out)
        storage.atomic_write_json(storage.join(out, "generation.json"), record)
    return record


def reconstruction_quality(pipeline: DiffXPipeline, pixels: np.ndarray, age: float, sex: str,
                           seeds: Sequence[int], clinical: Mapping[str, Any] | None = None) -> dict[str, float]:
    """MS-SSIM and PSNR against the baseline image of Diff-X's reconstruction (inversion + injection, baseline
    prompt) and of the single prompt LDM (same prompt, no structure); means over seeds (thesis Results 2)."""
    from raypipe.metrics import ms_ssim, psnr
    from raypipe.preprocess.pvf import from_ldm_output, ldm_input

    base_prompt, _ = future_prompts(age, sex, [], clinical)
    image = torch.from_numpy(ldm_input(pixels, pipeline.model.image_size))[None]
    target = from_ldm_output(image[0, 0].numpy())
    seeds = [int(v) for v in seeds]
    out: dict[str, float] = {}
    for name, images in (("diffx", pipeline(image, base_prompt, [base_prompt], seeds)),
                         ("single", pipeline.sample_single([base_prompt], seeds))):
        grey = from_ldm_output(images[0, :, 0].numpy())  # (seeds, H, W)
        out[f"{name}_ms_ssim"] = float(np.mean([ms_ssim(g, target, data_range=1.0) for g in grey]))
        out[f"{name}_psnr"] = float(np.mean([psnr(g, target, data_range=1.0) for g in grey]))
    return out


def steps_agreement(pipeline: DiffXPipeline, image: Tensor, baseline_prompt: str, prompts: Sequence[str],
                    seeds: Sequence[int], steps: Sequence[int] = (20, 50)) -> dict[str, float]:
    """Quality check for fewer solver steps: MS-SSIM of each step count's images against the last count's.

    Same image, prompts and seeds at every count; returns ``ms_ssim_<n>_vs_<last>`` (mean over prompts x seeds,
    1 = identical) and ``seconds_<n>`` per count. The pipeline's settings are restored afterwards.
    """
    import time

    from raypipe.metrics import ms_ssim
    from raypipe.preprocess.pvf import from_ldm_output

    counts = [int(n) for n in steps]
    if len(counts) < 2 or min(counts) < 1:
        raise ValueError(f"steps needs at least two counts >= 1, got {list(steps)}")
    original = pipeline.settings
    grey: dict[int, np.ndarray] = {}
    out: dict[str, float] = {}
    try:
        for n in counts:
            pipeline.settings = original.replace(steps=n)
            t0 = time.perf_counter()
            images = pipeline(image, baseline_prompt, list(prompts), [int(v) for v in seeds])
            out[f"seconds_{n}"] = time.perf_counter() - t0
            grey[n] = from_ldm_output(images[:, :, 0].float().numpy()).reshape(-1, *images.shape[-2:])
    finally:
        pipeline.settings = original
    ref = counts[-1]
    for n in counts[:-1]:
        out[f"ms_ssim_{n}_vs_{ref}"] = float(np.mean([ms_ssim(a, b, data_range=1.0) for a, b in zip(grey[n], grey[ref])]))
    return out


@contextmanager
def step_progress(pipeline: DiffXPipeline, desc: str) -> Iterator[None]:
    """A tqdm bar on stderr over the pipeline's DDIM steps (inversion, then denoising), with rate and ETA."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    bar = tqdm(total=pipeline.steps_per_call(), desc=desc, unit="step", file=sys.stderr, dynamic_ncols=interactive,
               mininterval=0.2 if interactive else 10.0)
    previous = pipeline.on_step

    def tick(phase: str) -> None:
        bar.set_postfix_str(phase, refresh=False)
        bar.update(1)

    pipeline.on_step = tick
    try:
        yield
    finally:
        pipeline.on_step = previous
        bar.close()


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    """An int n means seeds 0..n-1; a sequence is taken as given."""
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return list(range(int(seeds)))
    return [int(s) for s in seeds]


def generate(
    image: str | Path | np.ndarray,
    age: float,
    sex: str,
    years: Sequence[float] = DEFAULT_YEARS,
    seeds: int | Sequence[int] = DEFAULT_SEEDS,
    model_dir: str | Path | None = None,
    pvf_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    last_followup_years: float | None = None,
    clinical: Mapping[str, Any] | None = None,
    device: str | None = None,
    bf16: bool | None = None,
    **sampler: Any,
) -> dict[str, Any]:
    """Future radiographs for one patient: PNG per (year, seed) + generation.json in `out_dir`; returns the record."""
    from raypipe.io.radiograph import read_radiograph

    if model_dir is None or out_dir is None:
        raise ValueError("model_dir and out_dir are required")
    pixels = image if isinstance(image, np.ndarray) else read_radiograph(image).pixels
    pipe = pipeline_from_dir(model_dir, device, bf16, **sampler)
    pvf = None
    if pvf_dir is not None:
        from raypipe.scoring.pvf import load_pvf

        pvf = load_pvf(pvf_dir, pipe.device)
    ys = [float(y) for y in years]
    if last_followup_years is not None and float(last_followup_years) not in ys:
        ys.append(float(last_followup_years))
    with step_progress(pipe, f"Diff-X {len(ys)} year(s) x {len(_seed_list(seeds))} seed(s)"):
        record = generate_study(pipe, pixels, age, sex, ys, _seed_list(seeds), out_dir, pvf, clinical)
    record["model_dir"] = str(model_dir)
    if pvf_dir is not None:
        record["pvf_dir"] = str(pvf_dir)
    from raypipe import storage

    storage.atomic_write_json(storage.join(storage.absolute(out_dir), "generation.json"), record)
    log.info("generated %d images into %s", len(ys) * len(_seed_list(seeds)), out_dir)
    return record


def generate_cli(args: argparse.Namespace) -> int:
    """`raypipe generate --image X --age A --sex S --years 1,5,10 --seeds 10 --model DIR [--pvf DIR] --out DIR`."""
    years = [float(y) for y in str(args.years).split(",") if y.strip()]
    seeds_arg = str(args.seeds)
    seeds: int | list[int] = [int(s) for s in seeds_arg.split(",")] if "," in seeds_arg else int(seeds_arg)
    record = generate(args.image, args.age, args.sex, years, seeds, args.model, getattr(args, "pvf", None), args.out,
                      last_followup_years=getattr(args, "last_followup", None), device=getattr(args, "device", None),
                      bf16=getattr(args, "bf16", None), steps=getattr(args, "steps", None),
                      eta=getattr(args, "eta", None))
    summary = {k: record.get(k) for k in ("bpvf", "gpvf", "uncertainty", "group") if k in record}
    log.info("generation.json written to %s %s", args.out, json.dumps(summary) if summary else "")
    return 0
