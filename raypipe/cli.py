"""The `raypipe` command: one subcommand per user step; each handler imports its module lazily.

Model names come from the task registry (`raypipe.tasks`) and nowhere else. User errors (a missing file,
a bad config key, an empty shard folder) end with one line naming what to fix and exit code 1; `-v`
shows the traceback as well. Every path may be an `s3://` / `gs://` URI. Relative input paths (`--data`,
`--manifest`, `RUN_DIR`, `--registry`, `--model`, `--pvf`, `--image`) and `--out` resolve under
`RAYPIPE_STORAGE` when it is set (a bucket or a shared folder, as on a cluster) and the path is not here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("raypipe")


class UsageError(Exception):
    """A command-line mistake the user fixes by changing the command (printed as one line)."""


# ---------------------------------------------------------------------------------------------- helpers
def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs as dotted-key overrides; values are read as YAML scalars/lists (`lr=1e-4`)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {key}: cannot read value {raw!r}: {exc}") from None
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as text
            try:
                value = float(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def require_path(path: str | None, what: str) -> str:
    """A local input must exist (URIs are checked where they are read)."""
    from raypipe import storage

    if path is None:
        raise UsageError(f"{what} is required")
    if not storage.is_uri(path) and not os.path.exists(path):
        raise UsageError(f"{what} not found: {path}")
    return path


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted for nested keys, e.g. --set lr=1e-4 --set cv.folds=5); "
                        "repeatable")


def _add_devices(p: argparse.ArgumentParser, unit: str = "worker") -> None:
    """`--gpus N` / `--cpu` (mutually exclusive): the config's use_gpu, overridden from the command line."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpus", type=float, default=None, metavar="N",
                   help=f"GPUs per {unit} (implies use_gpu; requested even before the cluster has GPU nodes)")
    g.add_argument("--cpu", action="store_true",
                   help="run on CPU only, whatever the config's use_gpu says (the only way to get CPU when it asks for GPUs)")


def _add_mlflow(p: argparse.ArgumentParser) -> None:
    """`--mlflow`: track the run (raypipe.tracking)."""
    p.add_argument("--mlflow", action="store_true",
                   help="track params, per-epoch metrics, final metrics and metrics.json/report.html in MLflow: "
                        "MLFLOW_TRACKING_URI when set (then tracking is on even without this flag), else OUT/mlruns")


def device_overrides(gpus: float | None, cpu: bool, key: str = "gpus_per_worker") -> dict[str, Any]:
    """Config overrides of `--gpus N` (use_gpu + N GPUs per worker/replica) and `--cpu` (use_gpu false)."""
    if gpus is not None and cpu:
        raise UsageError("--gpus and --cpu exclude each other")
    if cpu:
        log.info("--cpu: CPU only, whatever the config's use_gpu says")
        return {"use_gpu": False}
    if gpus is not None:
        if gpus <= 0:
            raise UsageError(f"--gpus must be positive, got {gpus:g} (use --cpu for CPU only)")
        return {"use_gpu": True, key: gpus}
    return {}


def _overrides(a: argparse.Namespace, key: str = "gpus_per_worker") -> dict[str, Any]:
    """`--set` overrides, then `--gpus` / `--cpu` on top."""
    return {**parse_overrides(a.overrides), **device_overrides(a.gpus, a.cpu, key)}


# ---------------------------------------------------------------------------------------------- handlers
def _cmd_synth(a: argparse.Namespace) -> int:
    if a.kind == "drr":
        if not (a.ct and a.masks and a.out):
            raise UsageError("synth drr needs --ct, --masks and --out")
        from raypipe.data.drr import synth_drr_cli

        a.overrides = parse_overrides(a.overrides)
        return synth_drr_cli(a)
    if a.out is None:
        raise UsageError("--out is required")
    from raypipe.data.synth import synth_cohort

    manifest = synth_cohort(a.kind, a.out, patients=a.patients, seed=a.seed, workers=a.workers, overwrite=a.overwrite)
    print(f"synthetic {a.kind} cohort of {a.patients} patients: {Path(manifest).parent} (manifest: {manifest})")
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from raypipe.io.manifest import validate_manifest

    rep = validate_manifest(require_path(a.manifest, "manifest"), check_files=not a.no_file_check)
    print(rep.summary())
    return 0 if rep.ok else 1


def _cmd_manifest_build(a: argparse.Namespace) -> int:
    from raypipe.io.manifest_build import manifest_build_cli

    return manifest_build_cli(a)


def _cmd_inspect(a: argparse.Namespace) -> int:
    from raypipe.io.inspect import format_inspection, inspect_path

    info = inspect_path(require_path(a.path, "image"), masks=a.masks, mask_labels=a.mask_labels)
    print(json.dumps(info, indent=2) if a.json else format_inspection(info))
    if a.png:
        from raypipe.io.inspect import inspect_picture

        print(f"QC picture: {inspect_picture(a.path, a.png, a.masks, a.mask_labels, a.keypoints)}", file=sys.stderr)
    return 0


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from raypipe.ray_utils import init_ray

    from raypipe.config import load_config
    from raypipe.preprocess.config import CTPreprocessConfig, XrayPreprocessConfig

    manifest = require_path(a.manifest, "--manifest")
    cfg = load_config(CTPreprocessConfig if a.kind == "ct" else XrayPreprocessConfig, a.config,
                      parse_overrides(a.overrides))
    init_ray(quiet=False)
    if a.kind == "ct":
        from raypipe.data.ct_pipeline import preprocess_ct

        summary = preprocess_ct(manifest, a.out, config=cfg)
    else:
        from raypipe.data.xray_pipeline import preprocess_xray

        summary = preprocess_xray(manifest, a.out, config=cfg)
    print(json.dumps(summary, indent=2, default=str))
    errors = int(summary.get("error", 0) or 0)
    if errors and not a.allow_errors:
        print(f"raypipe preprocess: {errors} stud{'y' if errors == 1 else 'ies'} failed (see qc.csv in {a.out}); "
              "fix them or pass --allow-errors to accept the shards without them", file=sys.stderr)
        return 1
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from raypipe.evaluate import evaluate, summary_lines

    paths = [require_path(p, "prediction file") for p in a.predictions]
    horizons = None
    if a.horizons:
        horizons = [float(h) for h in a.horizons.split(",") if h.strip()]
    result = evaluate(paths, a.out, reference_model=a.reference, n_boot=a.n_boot, seed=a.seed,
                      horizons_years=horizons)
    for line in summary_lines(result):
        print(line)
    from raypipe import storage

    print(f"report: {storage.join(a.out, 'report.html')}")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from raypipe.train.run import train_task

    out = train_task(a.model, a.config, require_path(a.data, "--data"), a.out, _overrides(a), mlflow=a.mlflow)
    print(f"run written to {out}")
    return 0


def _cmd_cv(a: argparse.Namespace) -> int:
    from raypipe import storage
    from raypipe.tune.cv import cv_cli, summary_table

    data = require_path(a.data, "--data")
    result = cv_cli(a.model, a.config, a.folds, data, a.out, overrides=_overrides(a), mlflow=a.mlflow)
    if a.baselines:  # the clinical models on the very same folds (papers/000 Table 4)
        from raypipe.tune.baselines import run_clinical_cv

        cfg = result.config
        clinical = run_clinical_cv(data, storage.join(result.out_dir, "clinical"),
                                   label=getattr(cfg, "label", "fracture_5y"), seed=int(getattr(cfg, "seed", 0)),
                                   folds_csv=storage.join(result.out_dir, "folds.csv"), n_boot=int(cfg.n_boot))
        print("\n".join(summary_table(clinical)))
    return 0


def _cmd_tune(a: argparse.Namespace) -> int:
    from raypipe.tune.search import tune_cli

    return tune_cli(a.model, require_path(a.config, "--config"), a.trials, require_path(a.data, "--data"), a.out,
                    overrides=_overrides(a), mlflow=a.mlflow)


def _cmd_generate(a: argparse.Namespace) -> int:
    from raypipe.generate import generate_cli

    require_path(a.image, "--image")
    if a.cpu or a.gpus is not None:
        wanted = "cpu" if a.cpu else "cuda"
        if a.gpus is not None and a.gpus != 1:
            raise UsageError(f"--gpus {a.gpus:g}: one-patient generation runs on one device; use --gpus 1")
        if a.device is not None and a.device.split(":")[0] != wanted:
            raise UsageError(f"--device {a.device} contradicts {'--cpu' if a.cpu else '--gpus'}")
        if wanted == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--gpus 1: torch sees no CUDA device on this machine (use --cpu)")
        a.device = a.device or wanted
    log.info("Diff-X generation on %s", a.device or "CUDA when present, else CPU (--gpus 1 / --cpu decide)")
    return generate_cli(a)


def _cmd_generate_batch(a: argparse.Namespace) -> int:
    from raypipe.data.generate_pipeline import generate_cohort_cli

    return generate_cohort_cli(require_path(a.data, "--data"), require_path(a.model, "--model"), a.out,
                               require_path(a.pvf, "--pvf") if a.pvf else None, a.config,
                               overrides=_overrides(a, key="gpus_per_replica"),
                               age_dir=require_path(a.age_model, "--age-model") if a.age_model else None)


def _cmd_publish(a: argparse.Namespace) -> int:
    from raypipe.serving.cli import publish_cli

    return publish_cli(a)


def _cmd_serve(a: argparse.Namespace) -> int:
    from raypipe.serving.cli import serve_cli

    return serve_cli(a)


def _cmd_demo(a: argparse.Namespace) -> int:
    from raypipe.demo import run_demo

    return run_demo(a.out, patients=a.patients, seed=a.seed, xray_patients=a.xray_patients)


# ---------------------------------------------------------------------------------------------- parser
def add_generate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `raypipe generate` options (DESIGN.md)."""
    p.add_argument("--image", required=True, help="baseline lateral radiograph (DICOM or PNG)")
    p.add_argument("--age", type=float, required=True, help="age at baseline in years (goes into the prompt)")
    p.add_argument("--sex", required=True, help="F or M (goes into the prompt)")
    p.add_argument("--years", default="1,5,10", help="comma-separated years after baseline to generate")
    p.add_argument("--last-followup", type=float, default=None, help="extra time point: years to last follow-up")
    p.add_argument("--seeds", default="10", help="a count N (seeds 0..N-1) or comma-separated seeds")
    p.add_argument("--model", required=True, help="`raypipe train ldm` output or registry version folder")
    p.add_argument("--pvf", default=None, help="`raypipe train pvf` output or registry version folder (adds scores)")
    p.add_argument("--out", required=True, help="output folder: one PNG per (year, seed) + generation.json")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's sampler setting)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta, 0 = deterministic (default: the model's)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: CUDA when present)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for a GPU, fp32 on CPU; --no-bf16 for fp32 on a GPU)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options (DESIGN.md's command table); model names from `raypipe.tasks`."""
    from raypipe.tasks import DATA_HELP, TASKS, cv_names, train_names, tune_names

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="raypipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one step of the pipeline")

    def cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt)

    s = cmd("synth", "synthetic cohort (DICOM + masks/keypoints + manifest.csv), or a DRR of a real CT")
    s.add_argument("kind", choices=["ct", "xray", "both", "drr"], help="what to synthesise")
    s.add_argument("--out", type=str, help="output folder (required)")
    s.add_argument("--patients", type=int, default=20, help="patients in the cohort")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same cohort)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.add_argument("--ct", type=str, help="(drr) CT volume: NIfTI or DICOM folder")
    s.add_argument("--masks", type=str, help="(drr) vertebra masks: TotalSegmentator folder or multilabel file")
    s.add_argument("--config", type=str, default=None, help="(drr) DRR geometry config YAML")
    _add_set(s)
    s.set_defaults(func=_cmd_synth)

    s = cmd("validate", "check a cohort manifest; exit 1 listing every problem")
    s.add_argument("manifest", help="manifest CSV or Parquet")
    s.add_argument("--no-file-check", action="store_true", help="skip checking that image/mask files exist")
    s.set_defaults(func=_cmd_validate)

    from raypipe.io.series_selection import SelectionRules

    rules = SelectionRules()
    s = sub.add_parser("manifest", help="build a cohort manifest from a DICOM export (docs/MANIFEST.md)")
    b = s.add_subparsers(dest="manifest_command", required=True, metavar="STEP", help="build").add_parser(
        "build", help="DICOM export + clinical CSV (+ masks) -> manifest.csv + selection.csv, then validate")
    b.add_argument("export", help="folder of the DICOM export (any nesting and file names; non-DICOM files ignored)")
    b.add_argument("--clinical", required=True,
                   help="CSV with one row per patient_id: time_days, event and clinical columns")
    b.add_argument("--masks", default=None, help="folder of TotalSegmentator outputs, one folder (or multilabel "
                   ".nii.gz) per StudyInstanceUID, accession/StudyID or PatientID")
    b.add_argument("--out", required=True, help="manifest CSV to write (paths in it are relative to its folder)")
    b.add_argument("--selection", default=None, help="CSV saying why each series was taken or skipped "
                   "(default: selection.csv beside the manifest)")
    for flag, default, text in (
        ("--min-coverage-mm", rules.min_coverage_mm, "CT: z extent needed for T12-L4"),
        ("--min-slice-mm", rules.min_slice_mm, "CT: thinnest slices accepted"),
        ("--max-slice-mm", rules.max_slice_mm, "CT: thickest slices accepted"),
        ("--max-tilt-deg", rules.max_tilt_deg, "CT: largest angle of the slice normal from z still counted as axial"),
    ):
        b.add_argument(flag, type=float, default=default, help=f"{text} (default: %(default)s)")
    b.set_defaults(func=_cmd_manifest_build)

    s = cmd("inspect", "geometry, orientation and intensity of a CT or radiograph")
    s.add_argument("path", help="DICOM series folder, DICOM file, NIfTI or PNG")
    s.add_argument("--masks", type=str, default=None,
                   help="vertebra/muscle masks: TotalSegmentator folder or multilabel NIfTI (adds per-mask stats)")
    s.add_argument("--mask-labels", type=str, default=None, help="multilabel convention: verse | totalseg | JSON map")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.add_argument("--png", default=None, metavar="OUT.png",
                   help="write the study's QC picture (CT: slices, crop boxes, mask outlines; radiograph: keypoints, "
                        "patches)")
    s.add_argument("--keypoints", default=None, help="radiograph keypoints JSON for --png")
    s.set_defaults(func=_cmd_inspect)

    s = cmd("preprocess", "Ray Data: manifest -> Parquet shards + qc.csv")
    s.add_argument("kind", choices=["ct", "xray"], help="which studies of the manifest")
    s.add_argument("--manifest", required=True, help="cohort manifest (CSV or Parquet)")
    s.add_argument("--out", required=True, help="shards folder (local path or s3/gs URI)")
    s.add_argument("--config", default=None, help="preprocessing config YAML (default: the papers' settings)")
    s.add_argument("--allow-errors", action="store_true",
                   help="exit 0 even when some studies failed (they are listed in qc.csv and left out)")
    _add_set(s)
    s.set_defaults(func=_cmd_preprocess)

    tasks_help = "; ".join(f"{n}: {t.summary}" for n, t in TASKS.items())
    s = cmd("train", "Ray Train: one model on preprocessed shards (or a manifest)")
    s.add_argument("model", choices=train_names(), help=tasks_help)
    s.add_argument("--config", default=None, help="YAML config (jobs/configs/); default: the paper's settings")
    s.add_argument("--data", required=True,
                   help="; ".join(f"{n}: {DATA_HELP[t.data]}" for n, t in TASKS.items()))
    s.add_argument("--out", default=None, help="run folder (default: runs/<model name>); same folder resumes")
    _add_set(s)
    _add_devices(s)
    _add_mlflow(s)
    s.set_defaults(func=_cmd_train)

    s = cmd("cv", "k-fold cross-validation, patient-level, one Tune trial per fold (nested model selection)")
    s.add_argument("model", choices=cv_names(), help="task to cross-validate")
    s.add_argument("--config", default=None, help="YAML config; an optional `cv:` section sets CV options")
    s.add_argument("--folds", type=int, default=None, help="k (default: the config's cv.folds, else 10)")
    s.add_argument("--data", required=True, help="folder of preprocessed shards (pvf: or a manifest)")
    s.add_argument("--out", default=None, help="CV folder (default: runs/cv_<model>); same folder resumes")
    s.add_argument("--baselines", action="store_true",
                   help="also cross-validate the clinical models (A-D, FRAX) with the same folds into OUT/clinical")
    _add_set(s)
    _add_devices(s)
    _add_mlflow(s)
    s.set_defaults(func=_cmd_cv)

    s = cmd("tune", "Optuna TPE + ASHA over a search-space YAML")
    s.add_argument("model", choices=tune_names(), help="task to search")
    s.add_argument("--config", required=True, help="search-space YAML (e.g. jobs/configs/xray_deepsurv_search.yaml)")
    s.add_argument("--trials", type=int, default=8, help="trials to run")
    s.add_argument("--data", required=True, help="folder of preprocessed shards")
    s.add_argument("--out", default=None, help="search folder (default: runs/tune_<model>); same folder resumes")
    _add_set(s)
    _add_devices(s)
    _add_mlflow(s)
    s.set_defaults(func=_cmd_tune)

    s = add_generate_arguments(cmd("generate", "Diff-X: future radiographs of one patient + pVF risk group"))
    _add_devices(s, unit="run (1: CUDA)")
    s.set_defaults(func=_cmd_generate)

    s = cmd("generate-batch", "Diff-X over a cohort manifest on Ray Data: BpVF, GpVF, risk groups, predictions")
    s.add_argument("--data", required=True, help="cohort manifest with XR rows (age, sex, follow-up)")
    s.add_argument("--model", required=True, help="`raypipe train ldm` output or registry version folder")
    s.add_argument("--pvf", default=None, help="`raypipe train pvf` output or registry version folder")
    s.add_argument("--age-model", default=None,
                   help="`raypipe train age` output or registry version: predicts each generated image's age "
                        "(age_predictions.parquet, age_regression in diffx_metrics.json)")
    s.add_argument("--out", required=True, help="output folder (predictions.parquet, diffx_metrics.json, images)")
    s.add_argument("--config", default=None, help="generation YAML (jobs/configs/generate.yaml)")
    _add_set(s)
    _add_devices(s, unit="model replica")
    s.set_defaults(func=_cmd_generate_batch)

    s = cmd("publish", "copy a train/cv output folder into the model registry as a new version")
    s.add_argument("run_dir", help="output folder of `raypipe train` or `raypipe cv`")
    s.add_argument("--registry", required=True, help="registry folder")
    s.add_argument("--name", required=True, help="model name in the registry (ct, xray, pvf, ldm for Serve)")
    s.add_argument("--notes", default="", help="free text for the model card")
    s.set_defaults(func=_cmd_publish)

    s = cmd("serve", "local Ray Serve app over the registry's latest models")
    s.add_argument("--registry", required=True, help="registry folder")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--host", default="127.0.0.1", help="bind address (not loopback: needs RAYPIPE_API_TOKEN)")
    s.add_argument("--insecure-no-token", action="store_true",
                   help="allow a non-loopback bind without RAYPIPE_API_TOKEN (anyone who reaches it can score)")
    s.set_defaults(func=_cmd_serve)

    s = cmd("evaluate", "metrics.json + report.html from prediction files")
    s.add_argument("predictions", nargs="+", help="prediction files (predictions.parquet of train/cv/generation)")
    s.add_argument("--out", required=True, help="report folder")
    s.add_argument("--reference", default=None, help="model the others are compared against (default: the first)")
    s.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (by patient) for the 95%% CIs")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    s.add_argument("--horizons", default=None,
                   help="td-AUROC/calibration times in years, comma-separated (default: 1,2,3,5; 1,5,10 for Diff-X)")
    s.set_defaults(func=_cmd_evaluate)

    s = cmd("demo", "the whole pipeline on a small synthetic cohort (+ the real CT)")
    s.add_argument("--out", default="demo_out", help="output folder")
    s.add_argument("--patients", type=int, default=40, help="patients in the synthetic CT + radiograph cohort")
    s.add_argument("--xray-patients", type=int, default=500,
                   help="patients in the radiograph-only cohort DeepSurv and pVF learn from (500: ~300 training "
                        "radiographs, about what the tiny pVF classifier needs)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=_cmd_demo)
    return p


def _resolve_storage(args: argparse.Namespace) -> None:
    """Relative input paths (--data, --manifest, RUN_DIR, --registry, --model, --pvf, --image) and --out under
    RAYPIPE_STORAGE when set (see module doc)."""
    from raypipe.cluster import resolve_input, resolve_output, storage_root

    if not storage_root():
        return
    inputs = ["data", "manifest", "run_dir", "registry", "pvf", "age_model", "image"]
    if args.command in ("generate", "generate-batch"):  # elsewhere MODEL is a task name, not a path
        inputs.append("model")
    for name in inputs:
        if getattr(args, name, None):
            setattr(args, name, resolve_input(getattr(args, name)))
    if getattr(args, "out", None) and args.command not in ("synth", "demo"):
        args.out = resolve_output(args.out)


USER_ERRORS: tuple[type[BaseException], ...] = (UsageError, FileNotFoundError, FileExistsError, KeyError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; user errors print one line naming what to fix and exit 1."""
    from raypipe.io.errors import RaypipeInputError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        _resolve_storage(args)
        return int(handler(args) or 0)
    except (RaypipeInputError, *USER_ERRORS) as e:
        if args.verbose:
            raise
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"raypipe {args.command}: error: {' '.join(text.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
