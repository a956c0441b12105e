"""`raypipe demo`: the whole pipeline on a small synthetic cohort (and the real example CT when present).

Each step is a small function that prints what it did and where its outputs are; the demo stops at the
first failure with that step's name. Steps that need `../shared/data` say so and are skipped without it.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CT_DIR = SHARED_DATA / "ct" / "totalseg_example"
REAL_CT = REAL_CT_DIR / "example_ct.nii.gz"
REAL_CT_MASKS = REAL_CT_DIR / "example_seg"
REAL_CT_BODY = REAL_CT_DIR / "extra_head_labels" / "spine_report_totalseg_vertebrae_body.nii.gz"
TINY_CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


class Demo:
    """The demo's steps over one output folder; `state` carries results from step to step."""

    def __init__(self, out: Path, patients: int, seed: int, xray_patients: int = 500) -> None:
        self.out, self.patients, self.seed, self.xray_patients = out, patients, seed, xray_patients
        self.cohort = out / "cohort"
        self.xray_cohort = out / "cohort_xray"
        self.state: dict[str, Any] = {}

    def synth(self) -> str:
        from raypipe.data.synth import synth_cohort

        manifest = synth_cohort("both", self.cohort, patients=self.patients, seed=self.seed, overwrite=True)
        self.state["manifest"] = Path(manifest)
        # radiographs are cheap to make and to learn from: DeepSurv and pVF get a cohort large enough to learn
        # within the demo's time, while the CT series (and the CT models) stay at `patients`
        xray = synth_cohort("xray", self.xray_cohort, patients=self.xray_patients, seed=self.seed, overwrite=True)
        self.state["xray_manifest"] = Path(xray)
        return (f"{self.patients} patients (CT series + lateral radiographs): {manifest}\n"
                f"   {self.xray_patients} patients (lateral radiographs, for DeepSurv and pVF): {xray}")

    def validate(self) -> str:
        from raypipe.io.manifest import validate_manifest

        for key in ("manifest", "xray_manifest"):
            rep = validate_manifest(self.state[key])
            _indent(rep.summary())
            if not rep.ok:
                raise SystemExit(f"demo: the synthetic manifest {self.state[key]} failed validation")
        return "manifests valid"

    def inspect_real(self) -> str:
        if not REAL_CT.exists():
            return f"skipped: {SHARED_DATA} not found (the real example CT lives there)"
        from raypipe.io.inspect import format_inspection, inspect_path

        _indent(format_inspection(inspect_path(REAL_CT, masks=REAL_CT_MASKS)))
        return "real CT inspected"

    def preprocess_ct(self) -> str:
        from raypipe.data.ct_pipeline import preprocess_ct
        from raypipe.ray_utils import init_ray

        init_ray()
        s = preprocess_ct(self.state["manifest"], self.out / "shards" / "ct")
        self.state["ct_shards"] = Path(s["out"])
        msg = (f"{s['ok']} of {s['studies']} synthetic CT studies -> {s['out']} (qc: {s['qc_path']}; "
               f"QC pictures of the worst: {s['qc_contact_sheet']})")
        if REAL_CT.exists():
            real = _one_row_manifest(self.out / "real_ct", REAL_CT, REAL_CT_MASKS, REAL_CT_BODY)
            r = preprocess_ct(real, self.out / "shards" / "ct_real")
            import pandas as pd

            qc = pd.read_csv(r["qc_path"]).iloc[0]
            msg += f"\n   real CT: {qc['status']}, {qc['n_slices']} slices T12-L4; QC warnings: {qc['warnings']}"
        return msg

    def drr(self) -> str:
        if not REAL_CT.exists():
            return f"skipped: {SHARED_DATA} not found"
        from raypipe.data.drr import synth_drr

        r = synth_drr(REAL_CT, REAL_CT_MASKS, self.out / "drr")
        return f"lateral DRR of the real CT {r['shape'][0]}x{r['shape'][1]} px with L1-L5 keypoints: {r['png']}"

    def preprocess_xray(self) -> str:
        from raypipe.data.xray_pipeline import preprocess_xray

        s = preprocess_xray(self.state["xray_manifest"], self.out / "shards" / "xray")
        self.state["xray_shards"] = Path(s["out"])
        msg = f"{s['ok']} of {s['studies']} synthetic radiographs -> {s['out']} ({s['variant']}, {s['channels']} channels)"
        if (self.out / "drr" / "manifest.csv").exists():
            r = preprocess_xray(self.out / "drr" / "manifest.csv", self.out / "shards" / "xray_drr")
            msg += f"\n   real-CT DRR: {r['ok']} of {r['studies']} aligned into L1-L5 patches -> {r['out']}"
        return msg

    def cv_ct(self) -> str:
        from raypipe.tune.cv import cv_cli

        out = self.out / "runs" / "ct_cv"
        cv_cli("cnn-rnn", str(TINY_CONFIGS / "ct_tiny.yaml"), 2, str(self.state["ct_shards"]), str(out))
        self.state["ct_cv"] = out
        return f"2-fold CV of the tiny CNN-RNN (one Tune trial per fold, Ray Train inside) -> {out}"

    def evaluate_ct(self) -> str:
        from raypipe.evaluate import evaluate, summary_lines

        out = self.out / "reports" / "ct_cv"
        result = evaluate(self.state["ct_cv"] / "predictions.parquet", out, n_boot=200, seed=self.seed)
        _indent("\n".join(summary_lines(result)))
        _indent(self._against_ceiling("CT CNN-RNN", self.state["ct_cv"], "fracture_5y", "true_image_lp",
                                      ("val", "external"), self.state["manifest"], modality="CT"))
        return f"report: {out / 'report.html'}"

    def train_xray(self) -> str:
        from raypipe.train.run import train_task

        out = self.out / "runs" / "xray_deepsurv"
        train_task("deepsurv", str(TINY_CONFIGS / "xray_deepsurv_tiny.yaml"), str(self.state["xray_shards"]), str(out))
        self.state["xray_run"] = out
        _indent(self._against_ceiling("DeepSurv", out, "survival", "true_lp", ("test",), self.state["xray_manifest"]))
        return f"DeepSurv (image + clinical model 3, Cox partial likelihood) -> {out}"

    def train_pvf(self) -> str:
        from raypipe.train.run import train_task

        out = self.out / "runs" / "pvf"
        train_task("pvf", str(TINY_CONFIGS / "pvf_tiny.yaml"), str(self.state["xray_manifest"]), str(out))
        self.state["pvf_run"] = out
        _indent(self._against_ceiling(
            "pVF", out, "prevalent_fracture", "deformity", ("test",), self.state["xray_manifest"],
            why_short="the tiny classifier trains from random initialisation on the demo's ~300 radiographs for 50 "
                      "epochs (a 20 % wedge is ~4 px) and the test split is small; with more training radiographs it "
                      "comes closer (bench/ceiling.py --models pvf, bench/RESULTS.md)"))
        return f"prevalent-fracture classifier (EfficientNet, CLAHE) -> {out}"

    def train_ldm(self) -> str:
        from raypipe.train.run import train_task

        out = self.out / "runs" / "ldm"
        train_task("ldm", str(TINY_CONFIGS / "ldm_tiny.yaml"), str(self.state["manifest"]), str(out))
        self.state["ldm_run"] = out
        return f"Diff-X: VAE + structure LDM + prompt LDM -> {out}"

    def generate(self) -> str:
        import pandas as pd

        from raypipe.data.generate_pipeline import GenerateJobConfig, generate_cohort

        cfg = GenerateJobConfig(years=[1, 10], include_last_followup=False, seeds=2, split="test", bf16=False,
                                n_boot=50, image_quality=True)
        out = self.out / "diffx"
        r = generate_cohort(str(self.state["manifest"]), str(self.state["ldm_run"]), str(out),
                            str(self.state["pvf_run"]), cfg)
        preds = pd.read_parquet(r["predictions"])
        table = preds[["study_id", "bpvf", "score", "gpvf_sd", "gpvf_year", "group"]].rename(
            columns={"bpvf": "BpVF", "score": "GpVF", "gpvf_sd": "GpVF SD", "gpvf_year": "GpVF year"})
        _indent(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        q = r["metrics"].get("image_quality", {})
        if q:
            _indent("baseline reconstruction vs the real image (mean over patients): " + ", ".join(
                f"{k.replace('_', ' ')} {v['mean']:.3f}" for k, v in q.items()))
        groups = ", ".join(f"{k} {v}" for k, v in r["metrics"]["groups"].items())
        return f"{r['studies']} test-split patients x 2 time points x 2 seeds; groups: {groups} -> {out}"

    def publish(self) -> str:
        from raypipe.registry import publish

        registry = self.out / "registry"
        runs = {"ct": self.state["ct_cv"] / "folds" / "fold_00", "xray": self.state["xray_run"],
                "pvf": self.state["pvf_run"], "ldm": self.state["ldm_run"]}
        lines = []
        for name, run in runs.items():
            v = publish(run, registry, name, "raypipe demo: trained on the synthetic cohort")
            lines.append(f"{name} {v.version} <- {run}")
        _indent("\n".join(lines))
        self.state["registry"] = registry
        return f"registry: {registry}"

    def serve(self) -> str:
        from raypipe.serving.smoke import score_over_http

        _indent(score_over_http(self.state["registry"], self.state["manifest"],
                                real_ct=(REAL_CT, REAL_CT_MASKS) if REAL_CT.exists() else None))
        return "Serve app scored a CT and a radiograph over HTTP and shut down"

    def _against_ceiling(self, model: str, run: Path, kind: str, ceiling: str, splits: tuple[str, ...],
                         manifest_path: Path, modality: str = "XR", why_short: str = "") -> str:
        """The run's held-out figures beside the cohort's ceiling on the same rows and chance (only rows the
        run never selected on: a CV's out-of-fold and external rows, a training run's test split)."""
        import pandas as pd

        from raypipe.data.synth.ceiling import compare

        manifest = pd.read_csv(manifest_path, dtype={"patient_id": str, "study_id": str})
        comps, _ = compare(pd.read_parquet(run / "predictions.parquet"), manifest[manifest["modality"] == modality],
                           model, kind, ceiling, splits=splits, n_boot=200, seed=self.seed)
        if not comps:
            return f"{model}: no held-out rows with a known outcome in {run}"
        return "\n".join(c.line(why_short) for c in comps)

    def steps(self) -> list[tuple[str, Callable[[], str]]]:
        """The ordered steps (name, function)."""
        return [
            ("synthesise a cohort", self.synth),
            ("validate the manifest", self.validate),
            ("inspect the real example CT", self.inspect_real),
            ("preprocess CT on Ray Data", self.preprocess_ct),
            ("DRR of the real CT", self.drr),
            ("preprocess radiographs on Ray Data", self.preprocess_xray),
            ("CT: tiny 2-fold cross-validation on Ray Tune + Ray Train", self.cv_ct),
            ("CT: evaluate the out-of-fold and external predictions", self.evaluate_ct),
            ("X-ray: train DeepSurv on Ray Train", self.train_xray),
            ("Diff-X: train the pVF classifier", self.train_pvf),
            ("Diff-X: train the latent diffusion models", self.train_ldm),
            ("Diff-X: future radiographs and risk groups (Ray Data)", self.generate),
            ("publish the demo's models to a registry", self.publish),
            ("Ray Serve: score over HTTP", self.serve),
        ]


def _indent(text: str) -> None:
    print("   " + text.replace("\n", "\n   "), flush=True)


def _one_row_manifest(folder: Path, ct: Path, masks: Path, body: Path) -> Path:
    """A manifest for the real example CT (no outcome is known: placeholders, site 'real_example')."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    row = {"patient_id": "REAL_CT", "study_id": "REAL_CT_1", "modality": "CT", "image_path": str(ct),
           "mask_path": str(masks), "body_mask_path": str(body), "time_days": 3650, "event": 0, "site": "real_example"}
    path = folder / "manifest.csv"
    pd.DataFrame([row]).to_csv(path, index=False)
    return path


def run_demo(out: str | Path = "demo_out", patients: int = 40, seed: int = 0, xray_patients: int = 500) -> int:
    """Run every demo step into `out` and print where the outputs are."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, patients, seed, xray_patients)
    t0 = time.perf_counter()
    timings = {}
    for name, fn in demo.steps():
        t = time.perf_counter()
        print(f"\n== {name}", flush=True)
        msg = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"   {msg}  [{timings[name]:.1f} s]", flush=True)
    total = time.perf_counter() - t0
    (out / "demo_summary.json").write_text(json.dumps({"out": str(out), "seconds": timings}, indent=2))
    print(f"\ndemo finished in {total:.0f} s; outputs under {out}")
    return 0
