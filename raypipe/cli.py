"""The `raypipe` command: one subcommand per user step; each handler imports its module lazily."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("raypipe")


def _cmd_synth(a: argparse.Namespace) -> int:
    if a.kind == "drr":
        from raypipe.data.drr import synth_drr_cli

        return synth_drr_cli(a)
    if a.out is None:
        raise SystemExit("raypipe synth: --out is required")
    from raypipe.data.synth import synth_cohort

    manifest = synth_cohort(a.kind, a.out, patients=a.patients, seed=a.seed, workers=a.workers, overwrite=a.overwrite)
    print(f"synthetic {a.kind} cohort of {a.patients} patients: {Path(manifest).parent} (manifest: {manifest})")
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from raypipe.io.manifest import validate_manifest

    rep = validate_manifest(a.manifest, check_files=not a.no_file_check)
    print(rep.summary())
    return 0 if rep.ok else 1


def _cmd_inspect(a: argparse.Namespace) -> int:
    from raypipe.io.inspect import format_inspection, inspect_path

    info = inspect_path(a.path, masks=a.masks, mask_labels=a.mask_labels)
    print(json.dumps(info, indent=2) if a.json else format_inspection(info))
    if a.png:
        from raypipe.io.inspect import inspect_picture

        print(f"QC picture: {inspect_picture(a.path, a.png, a.masks, a.mask_labels, a.keypoints)}", file=sys.stderr)
    return 0


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from raypipe.ray_utils import init_ray

    init_ray()
    if a.kind == "ct":
        from raypipe.data.ct_pipeline import preprocess_ct

        summary = preprocess_ct(a.manifest, a.out, config_path=a.config)
    else:
        from raypipe.data.xray_pipeline import preprocess_xray

        summary = preprocess_xray(a.manifest, a.out, config_path=a.config)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from raypipe.evaluate import evaluate, summary_lines

    result = evaluate(a.predictions, a.out, reference_model=a.reference, n_boot=a.n_boot, seed=a.seed)
    for line in summary_lines(result):
        print(line)
    print(f"report: {Path(a.out) / 'report.html'}")
    return 0


TRAINERS = {  # MODEL -> (module, whether its train_cli takes the model name)
    "cnn-rnn": ("raypipe.train.ct", True),
    "multitask": ("raypipe.train.ct", True),
    "keypoints": ("raypipe.train.keypoints", True),
    "deepsurv": ("raypipe.train.deepsurv", True),
    "pvf": ("raypipe.train.pvf", False),
    "ldm": ("raypipe.train.ldm", False),
}


def _cmd_train(a: argparse.Namespace) -> int:
    import importlib

    module, takes_model = TRAINERS[a.model]
    train_cli = importlib.import_module(module).train_cli
    if takes_model:
        return train_cli(a.model, a.config, a.data, a.out)
    return train_cli(a.config, a.data, a.out)


def _cmd_cv(a: argparse.Namespace) -> int:
    from raypipe.tune.search import cv_cli

    return cv_cli(a.model, a.config, a.folds, a.data, a.out)


def _cmd_tune(a: argparse.Namespace) -> int:
    from raypipe.tune.search import tune_cli

    return tune_cli(a.model, a.config, a.trials, a.data, a.out)


def _cmd_generate(a: argparse.Namespace) -> int:
    from raypipe.generate import generate_cli

    return generate_cli(a)


def _cmd_publish(a: argparse.Namespace) -> int:
    from raypipe.serving.cli import publish_cli

    return publish_cli(a)


def _cmd_serve(a: argparse.Namespace) -> int:
    from raypipe.serving.cli import serve_cli

    return serve_cli(a)


def _cmd_demo(a: argparse.Namespace) -> int:
    from raypipe.demo import run_demo

    return run_demo(a.out, patients=a.patients, seed=a.seed)


def add_generate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `raypipe generate` options (DESIGN.md); shared with jobs/generate.py."""
    p.add_argument("--image", required=True, help="baseline radiograph (DICOM or PNG)")
    p.add_argument("--age", type=float, required=True)
    p.add_argument("--sex", required=True, help="F or M")
    p.add_argument("--years", default="1,5,10", help="comma-separated years after baseline")
    p.add_argument("--last-followup", type=float, default=None, help="extra time point: years to last follow-up")
    p.add_argument("--seeds", default="10", help="count (0..n-1) or comma-separated seeds")
    p.add_argument("--model", required=True, help="`raypipe train ldm` output or registry version folder")
    p.add_argument("--pvf", default=None, help="`raypipe train pvf` output or registry version folder")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    return p


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options (DESIGN.md's command table)."""
    p = argparse.ArgumentParser(prog="raypipe", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="synthetic cohort (DICOM + masks/keypoints + manifest.csv)")
    s.add_argument("kind", choices=["ct", "xray", "both", "drr"])
    s.add_argument("--out", type=str)
    s.add_argument("--patients", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--ct", type=str, help="(drr) CT volume: NIfTI or DICOM folder")
    s.add_argument("--masks", type=str, help="(drr) vertebra masks")
    s.add_argument("--config", type=str, default=None, help="(drr) DRR geometry config YAML")
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("validate", help="check a cohort manifest; exit 1 listing every problem")
    s.add_argument("manifest")
    s.add_argument("--no-file-check", action="store_true", help="skip checking that image/mask files exist")
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser("inspect", help="geometry, orientation and intensity of a CT or radiograph")
    s.add_argument("path")
    s.add_argument("--masks", type=str, default=None)
    s.add_argument("--mask-labels", type=str, default=None, help="verse | totalseg | label-map JSON")
    s.add_argument("--json", action="store_true")
    s.add_argument("--png", default=None, metavar="OUT.png",
                   help="write the study's QC picture (CT: slices, crop boxes, mask outlines; radiograph: keypoints, "
                        "patches)")
    s.add_argument("--keypoints", default=None, help="radiograph keypoints JSON for --png")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("preprocess", help="Ray Data: manifest -> Parquet shards + qc.csv")
    s.add_argument("kind", choices=["ct", "xray"])
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--config", default=None)
    s.set_defaults(func=_cmd_preprocess)

    s = sub.add_parser("train", help="Ray Train: one model on preprocessed shards (or a manifest)")
    s.add_argument("model", choices=sorted(TRAINERS))
    s.add_argument("--config", default=None, help="YAML (jobs/configs/); defaults: the paper's settings")
    s.add_argument("--data", default=None, help="preprocessed shards folder (manifest for keypoints/pvf/ldm)")
    s.add_argument("--out", default=None)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("cv", help="k-fold cross-validation, patient-level, one Tune trial per fold")
    s.add_argument("model", choices=["cnn-rnn", "multitask", "deepsurv"])
    s.add_argument("--config", default=None)
    s.add_argument("--folds", type=int, default=None)
    s.add_argument("--data", default=None)
    s.add_argument("--out", default=None)
    s.set_defaults(func=_cmd_cv)

    s = sub.add_parser("tune", help="Optuna TPE + ASHA over the search space YAML")
    s.add_argument("model", choices=["cnn-rnn", "multitask", "deepsurv"])
    s.add_argument("--config", default=None, help="search-space YAML (e.g. jobs/configs/xray_deepsurv_search.yaml)")
    s.add_argument("--trials", type=int, default=8)
    s.add_argument("--data", default=None)
    s.add_argument("--out", default=None)
    s.set_defaults(func=_cmd_tune)

    s = add_generate_arguments(sub.add_parser("generate", help="Diff-X: future radiographs + pVF risk group"))
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("publish", help="copy a train/cv output folder into the model registry")
    s.add_argument("run_dir")
    s.add_argument("--registry", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--notes", default="", help="free text for the model card")
    s.set_defaults(func=_cmd_publish)

    s = sub.add_parser("serve", help="local Ray Serve app over the registry's latest models")
    s.add_argument("--registry", required=True)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("evaluate", help="metrics.json + report.html from prediction files")
    s.add_argument("predictions", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--reference", default=None, help="model the others are compared against")
    s.add_argument("--n-boot", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("demo", help="the whole pipeline on a small synthetic cohort (+ the real CT)")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--patients", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; input errors print one clear message and exit 1."""
    from raypipe.io.errors import RaypipeInputError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(handler(args) or 0)
    except RaypipeInputError as e:
        print(f"raypipe {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
