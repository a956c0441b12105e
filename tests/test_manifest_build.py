"""`raypipe manifest build` on a messy export written with pydicom from the synthetic cohort, and on real DICOM.

The export plants what hospital exports hold: scouts, a dose SR and a dose screen, duplicate, bone, lung,
derived, sagittal and short reconstructions, an AP view and an unlabelled radiograph, two studies per
patient, one series sharing a folder with others, deep nesting, random file names, non-DICOM and broken files,
and masks keyed by PatientID, StudyID and StudyInstanceUID (one study without masks).
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from raypipe.cli import main
from raypipe.io.ct import read_ct
from raypipe.io.errors import RaypipeInputError
from raypipe.io.export import scan_export
from raypipe.io.series_selection import SelectionRules, kernel_class, select_series
from raypipe.io.manifest import load_manifest
from raypipe.io.manifest_build import build_manifest
from raypipe.io.masks import read_masks

OWNED = ["study_id", "modality", "image_path", "mask_path", "mask_labels", "body_mask_path", "keypoints_path"]
SR_DOSE = "1.2.840.10008.5.1.4.1.1.88.67"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _uid() -> str:
    return pydicom.uid.generate_uid(prefix="2.25.")


def _rand_name() -> str:
    return uuid.uuid4().hex[:12]


def _reseries(src: list[Path], dst: Path, *, z_step: float | None = None, repeat: int = 1, limit: int | None = None,
              study_uid: str | None = None, **fields: object) -> str:
    """Rewrite a CT series under new UIDs (random file names), optionally resliced; return its SeriesInstanceUID."""
    dst.mkdir(parents=True, exist_ok=True)
    series_uid = _uid()
    slices = sorted((pydicom.dcmread(p) for p in src), key=lambda d: float(d.ImagePositionPatient[2]))
    z0 = float(slices[0].ImagePositionPatient[2])
    k = 0
    for ds in slices[:limit]:
        for _ in range(repeat):
            out = pydicom.dcmread(ds.filename)
            out.SeriesInstanceUID = series_uid
            out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = _uid()
            if study_uid:
                out.StudyInstanceUID = study_uid
            if z_step is not None:
                ipp = [float(v) for v in out.ImagePositionPatient]
                out.ImagePositionPatient = [ipp[0], ipp[1], round(z0 + k * z_step, 3)]
                out.SliceLocation = round(z0 + k * z_step, 3)
                out.SliceThickness = out.SpacingBetweenSlices = z_step
            out.InstanceNumber = k + 1
            for key, val in fields.items():
                setattr(out, key, val)
            out.save_as(dst / _rand_name(), enforce_file_format=True)
            k += 1
    return series_uid


def _single(src: Path, dst: Path, sop_class: str | None = None, pixels: bool = True, **fields: object) -> str:
    """One derived object (scout, dose screen, SR, other view) from a template file; returns its series UID."""
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = _uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid()
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    for key, val in fields.items():
        if val is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, val)
    if not pixels:
        for key in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation", "ImageOrientationPatient", "ImagePositionPatient"):
            if key in ds:
                delattr(ds, key)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return str(ds.SeriesInstanceUID)


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The messy export, the masks folder, the clinical CSV, and what was planted where."""
    from raypipe.data.synth import synth_cohort

    root = tmp_path_factory.mktemp("export")
    manifest = synth_cohort("both", root / "cohort", patients=3, seed=7, workers=1)
    cohort = manifest.parent
    syn = pd.read_csv(manifest)
    exp, masks = root / "export", root / "masks"
    planted: dict[str, str] = {}

    # patient 0: deep nesting, random names, many reconstructions of one study, scout, dose SR/screen, AP view
    ct0 = sorted((cohort / "ct/SYN00000").glob("*.dcm"))
    deep = exp / "PACS" / "2020" / "SYN00000" / "a" / "b"
    planted["original"] = _reseries(ct0, deep / "s2" / _rand_name(), SeriesDescription="ABDOMEN 5.0")
    planted["thin"] = _reseries(ct0, deep / "s3", z_step=2.5, repeat=2, SeriesNumber=3,
                                SeriesDescription="ABDOMEN 2.5")
    planted["duplicate"] = _reseries(ct0, deep / "s4", z_step=2.5, repeat=2, SeriesNumber=4,
                                     SeriesDescription="ABDOMEN 2.5 copy")
    planted["bone"] = _reseries(ct0, deep / "s5", z_step=2.5, repeat=2, SeriesNumber=5, ConvolutionKernel="BONE",
                                SeriesDescription="ABDOMEN 2.5 BONE")
    planted["lung"] = _reseries(ct0, deep / "s6", SeriesNumber=6, ConvolutionKernel="LUNG", SeriesDescription="LUNG")
    planted["short"] = _reseries(ct0, deep / "s7", z_step=2.5, limit=30, SeriesNumber=7,
                                 SeriesDescription="ABDOMEN 2.5 partial")
    planted["derived"] = _reseries(ct0, deep / "s8", limit=20, SeriesNumber=8,
                                   ImageType=["DERIVED", "SECONDARY", "MIP"], SeriesDescription="MIP")
    planted["sagittal"] = _reseries(ct0, deep / "s9", limit=20, SeriesNumber=9,
                                    ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
                                    SeriesDescription="SAG")
    planted["scout"] = _single(ct0[0], deep / "s1" / _rand_name(), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                               SeriesDescription="Topogram 0.6 T20s", ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    planted["dose_sr"] = _single(ct0[0], deep / "dose" / _rand_name(), sop_class=SR_DOSE, pixels=False,
                                 Modality="SR", SeriesDescription="Dose Report")
    planted["dose_screen"] = _single(ct0[0], deep / "dose" / _rand_name(), sop_class=SC,
                                     ImageType=["DERIVED", "SECONDARY", "OTHER"], SeriesDescription="Patient Protocol")
    # one instance exported twice (same SOPInstanceUID under another name)
    first = next((deep / "s3").iterdir())
    shutil.copy(first, deep / "s3" / _rand_name())
    xr0 = cohort / "xray/SYN00000.dcm"
    planted["xr_lateral0"] = str(pydicom.dcmread(xr0).SeriesInstanceUID)
    shutil.copy(xr0, exp / "PACS" / "2020" / "SYN00000" / _rand_name())
    planted["xr_ap"] = _single(xr0, exp / "PACS" / "2020" / "SYN00000" / "ap" / _rand_name(), ViewPosition="AP",
                               SeriesDescription="L-SPINE AP", SeriesNumber=2)

    # patient 1: CT and radiograph studies in one flat folder with non-DICOM files; an unlabelled radiograph
    flat = exp / "flat"
    flat.mkdir(parents=True)
    for p in sorted((cohort / "ct/SYN00001").glob("*.dcm")):
        shutil.copy(p, flat / _rand_name())
    shutil.copy(cohort / "xray/SYN00001.dcm", flat / _rand_name())
    planted["flat_ct"] = str(pydicom.dcmread(next((cohort / "ct/SYN00001").glob("*.dcm"))).SeriesInstanceUID)
    planted["xr_unsure"] = _single(cohort / "xray/SYN00001.dcm", exp / "other" / _rand_name(), StudyInstanceUID=_uid(),
                                   ViewPosition=None, BodyPartExamined=None, SeriesDescription="")
    (flat / "README.txt").write_text("exported by PACS\n")
    (flat / "notes.pdf").write_bytes(b"%PDF-1.4 " + bytes(range(256)))
    (exp / ".DS_Store").write_bytes(b"\0\1\2")
    (exp / "empty").write_bytes(b"")
    (exp / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)

    # patient 2: two CT studies (a follow-up CT under a new StudyInstanceUID)
    ct2 = sorted((cohort / "ct/SYN00002").glob("*.dcm"))
    study1 = str(pydicom.dcmread(ct2[0]).StudyInstanceUID)
    _reseries(ct2, exp / "p2" / "baseline")
    study2 = _uid()
    planted["followup"] = _reseries(ct2, exp / "p2" / "followup", study_uid=study2, StudyID="FU2")

    masks.mkdir()
    shutil.copytree(cohort / "masks/SYN00000", masks / "SYN00000")          # by PatientID
    shutil.copytree(cohort / "masks/SYN00001", masks / "SYN00001_CT")       # by StudyID
    shutil.copytree(cohort / "masks/SYN00002", masks / study1)              # by StudyInstanceUID
    shutil.copytree(cohort / "masks/SYN00002", masks / "SYN00002")          # ambiguous: 2 CT studies
    (masks / "SYN99999").mkdir()                                            # matches nothing

    clinical = syn.drop_duplicates("patient_id").drop(columns=OWNED)
    clinical_csv = root / "clinical.csv"
    clinical.to_csv(clinical_csv, index=False)
    out = root / "out" / "manifest.csv"
    result = build_manifest(exp, clinical_csv, out, masks=masks)
    return dict(root=root, export=exp, masks=masks, clinical=clinical_csv, planted=planted, result=result,
                out=out, study1=study1, study2=study2, syn=syn, cohort=cohort)


def _selection(messy: dict) -> pd.DataFrame:
    return pd.read_csv(messy["result"].selection, dtype=str)


def test_every_planted_series_gets_its_decision_and_reason(messy: dict) -> None:
    sel = _selection(messy)
    by_series = sel.set_index("series_instance_uid")
    p = messy["planted"]
    expect = {
        "thin": ("taken", "taken"),
        "original": ("skipped", "thinner slices"),
        "duplicate": ("skipped", "duplicate of series " + p["thin"]),
        "bone": ("skipped", "preferred kernel"),
        "lung": ("skipped", "lung/sharp kernel"),
        "short": ("skipped", "z coverage 75 mm < 150 mm needed for T12-L4"),
        "derived": ("skipped", "ImageType DERIVED/SECONDARY/MIP"),
        "sagittal": ("skipped", "not axial"),
        "scout": ("skipped", "scout/localiser"),
        "dose_sr": ("skipped", "structured report"),
        "dose_screen": ("skipped", "secondary capture"),
        "xr_lateral0": ("taken", "taken"),
        "xr_ap": ("skipped", "frontal view (ViewPosition AP)"),
        "xr_unsure": ("skipped", "unsure: no BodyPartExamined"),
        "flat_ct": ("taken", "taken"),
        "followup": ("taken", "taken"),
    }
    for name, (decision, reason) in expect.items():
        row = by_series.loc[p[name]]
        assert row["decision"] == decision, (name, row.to_dict())
        assert reason in row["reason"], (name, row["reason"])
    n0 = len(list((messy["cohort"] / "ct/SYN00000").glob("*.dcm")))
    assert by_series.loc[p["thin"], "files"] == str(2 * n0 + 1)  # 2 x n0 slices + the instance exported twice
    assert by_series.loc[p["thin"], "slice_mm"] == "2.5"
    broken = sel[sel["location"] == "broken.dcm"]
    assert len(broken) == 1 and "unreadable DICOM file" in broken["reason"].iloc[0]
    assert messy["result"].non_dicom == 4                    # README.txt, notes.pdf, .DS_Store, the empty file


def test_manifest_rows_paths_masks_and_validation(messy: dict) -> None:
    res = messy["result"]
    assert res.report.ok, res.report.summary()
    assert res.unmatched_masks == ["SYN00002 (patient with 2 CT studies: name each by its StudyInstanceUID)",
                                   "SYN99999"]
    t = load_manifest(messy["out"])
    assert sorted(t.groupby("patient_id").size().items()) == [("SYN00000", 2), ("SYN00001", 2), ("SYN00002", 2)]
    assert t["study_id"].is_unique
    ct = t[t.modality == "CT"].set_index("study_id")
    assert set(ct["patient_id"]) == {"SYN00000", "SYN00001", "SYN00002"}
    # the chosen 2.5 mm reconstruction reads back as a volume of twice the 5 mm slices
    row0 = ct[ct.patient_id == "SYN00000"].iloc[0]
    vol = read_ct(row0["image_path"])
    assert vol.shape[0] == 2 * len(list((messy["cohort"] / "ct/SYN00000").glob("*.dcm")))
    assert vol.spacing[2] == pytest.approx(2.5)
    assert Path(row0["mask_path"]).name == "SYN00000" and row0["body_mask_path"].endswith("vertebrae_body.nii.gz")
    # the series that shared a folder is linked into series/<study_id>/ and reads as that series alone
    row1 = ct[ct.patient_id == "SYN00001"].iloc[0]
    assert Path(row1["image_path"]).parent == messy["out"].parent / "series"
    n1 = len(list((messy["cohort"] / "ct/SYN00001").glob("*.dcm")))
    assert read_ct(row1["image_path"]).shape[0] == n1
    assert Path(row1["mask_path"]).name == "SYN00001_CT"
    # two CT studies: the first has masks by StudyInstanceUID, the follow-up none (a warning, not a problem)
    assert Path(ct.loc[messy["study1"], "mask_path"]).name == messy["study1"]
    assert pd.isna(ct.loc[messy["study2"], "mask_path"])
    assert any("1 CT study without mask_path" in w for w in res.report.warnings), res.report.warnings
    masks = read_masks(ct.loc[messy["study1"], "mask_path"], read_ct(ct.loc[messy["study1"], "image_path"]))
    assert masks["vertebrae_L1"].any()
    # clinical columns copied per patient; the manifest's relative paths resolve from its own folder
    syn = messy["syn"].drop_duplicates("patient_id").set_index("patient_id")
    for pid, grp in t.groupby("patient_id"):
        assert (grp["time_days"] == syn.loc[pid, "time_days"]).all() and (grp["age"] == syn.loc[pid, "age"]).all()
    raw = pd.read_csv(messy["out"])
    assert not any(Path(v).is_absolute() for v in raw["image_path"])


def test_ct_without_masks_is_skipped_by_preprocessing_saying_why(messy: dict) -> None:
    """The follow-up CT has no masks: valid in the manifest, and the CT preprocessing skips it per study."""
    from raypipe.data.ct_pipeline import process_study
    from raypipe.preprocess.config import CTPreprocessConfig

    t = load_manifest(messy["out"])
    row = t[t.study_id == messy["study2"]].iloc[0].to_dict()
    record, qc = process_study(row, CTPreprocessConfig())
    assert record is None and qc["status"] == "skipped"
    assert "no mask_path in the manifest" in qc["message"] and row["image_path"] in qc["message"]


def test_cli_build_prints_summary_and_every_option_has_help(messy: dict, capsys, tmp_path: Path) -> None:
    out = tmp_path / "m" / "manifest.csv"
    rc = main(["manifest", "build", str(messy["export"]), "--clinical", str(messy["clinical"]), "--masks",
               str(messy["masks"]), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "valid" in text and "mask entries matching no study: SYN00002 (patient with 2 CT studies" in text
    assert (tmp_path / "m" / "selection.csv").is_file()
    with pytest.raises(SystemExit):
        main(["manifest", "build", "--help"])
    helptext = capsys.readouterr().out
    for opt, default in [("--clinical", None), ("--masks", None), ("--out", None),
                         ("--selection", "selection.csv beside the manifest"),
                         ("--min-coverage-mm", "150.0"), ("--min-slice-mm", "0.5"), ("--max-slice-mm", "5.0"),
                         ("--max-tilt-deg", "20.0")]:
        block = helptext[helptext.index(f"  {opt} "):].split("\n  -")[0]
        words = block.replace(opt, "").split()
        assert len(words) > 3, (opt, block)                     # the option has a help sentence
        if default is not None:
            assert f"(default: {default})" in " ".join(words), (opt, block)


def test_invalid_result_exits_1_and_says_why(messy: dict, tmp_path: Path, capsys) -> None:
    clinical = pd.read_csv(messy["clinical"]).rename(columns={"age": "agee"})
    csv = tmp_path / "clinical.csv"
    clinical.to_csv(csv, index=False)
    rc = main(["manifest", "build", str(messy["export"]), "--clinical", str(csv), "--out", str(tmp_path / "m.csv")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "column 'agee': unknown column, did you mean 'age'?" in out


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[t.patient_id != "SYN00002"], "no row in the clinical CSV: SYN00002"),
    (lambda t: t.assign(age=["71", "seventy", "60"]), "row 2, column 'age': not a number (value 'seventy')"),
    (lambda t: t.assign(event=[0, 2, 1]), "row 2, column 'event': must be 0 or 1 (value 2)"),
    (lambda t: pd.concat([t, t.iloc[[0]]]), "row 4, column 'patient_id': duplicate patient (first in row 1)"),
    (lambda t: t.assign(study_id="x"), "column 'study_id': written by `manifest build`"),
    (lambda t: t.drop(columns=["time_days"]), "column 'time_days': required column missing"),
    (lambda t: t.rename(columns={"patient_id": "PatientID"}), "did you mean to rename 'PatientID'?"),
])
def test_clinical_csv_problems_name_row_column_value(messy: dict, tmp_path: Path, capsys, edit, message) -> None:
    csv = tmp_path / "clinical.csv"
    edit(pd.read_csv(messy["clinical"], dtype={"patient_id": str})).to_csv(csv, index=False)
    with pytest.raises(RaypipeInputError) as err:
        build_manifest(messy["export"], csv, tmp_path / "m.csv")
    assert message in str(err.value) and str(csv) in str(err.value)
    assert main(["manifest", "build", str(messy["export"]), "--clinical", str(csv), "--out",
                 str(tmp_path / "m2.csv")]) == 1
    assert "raypipe manifest: error:" in capsys.readouterr().err


def test_kernel_classes() -> None:
    assert [kernel_class(k) for k in ("Br38f", "B31f", "B60f", "B70f", "STANDARD", "BONEPLUS", "LUNG", "FC03",
                                      "FC51", "C", "D", "YA", "", "XYZ")] == [
        "soft", "soft", "bone", "lung", "soft", "bone", "lung", "soft", "lung", "soft", "bone", "lung", "unknown",
        "unknown"]


def test_real_shared_data_every_file_explained(shared_data: Path, tmp_path: Path) -> None:
    """The real DICOM of ../shared/data (SOURCE.md files): none is a usable study, and each says why."""
    decisions = select_series(scan_export(shared_data))
    why = {(d.file or d.series.first).path.name: d.reason for d in decisions}
    assert not any(d.taken for d in decisions)
    assert "scout/localiser" in why["GH342.dcm"]                        # CT Surview
    assert "Modality MG" in why["GH133.dcm"]                            # mammogram
    assert "BodyPartExamined CHEST" in why["RG1_J2KI.dcm"]
    assert "BodyPartExamined EXTREMITY" in why["RG3_J2KR.dcm"]
    assert "secondary capture" in why["vlut_04.dcm"]
    assert "BodyPartExamined CHEST" in why["CR-MONO1-10-chest"]        # no preamble: read with force
    ct = [d for d in decisions if d.kind == "CT" and d.series.first.path.parent.name == "example_ct_dicom"]
    assert len(ct) == 1 and len(ct[0].series.files) == 20              # anonymised: no UIDs, grouped by folder
    assert "z coverage 40 mm < 150 mm" in ct[0].reason
    clinical = tmp_path / "clinical.csv"
    pd.DataFrame({"patient_id": ["X"], "time_days": [100], "event": [0]}).to_csv(clinical, index=False)
    with pytest.raises(RaypipeInputError, match="no usable CT series"):
        build_manifest(shared_data, clinical, tmp_path / "m.csv")
    assert (tmp_path / "selection.csv").is_file()


def test_real_ct_with_patient_id_builds_with_multilabel_mask(shared_data: Path, tmp_path: Path) -> None:
    """The real 20-slice CT (JPEG 2000, no UIDs) gets a PatientID; with a 30 mm coverage limit it is taken."""
    exp = tmp_path / "export" / "study"
    exp.mkdir(parents=True)
    for p in sorted((shared_data / "ct/totalseg_example/example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(p)
        ds.PatientID = "REAL01"
        ds.save_as(exp / p.name)
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(shared_data / "ct/totalseg_example/extra_head_labels/example_seg_dicom.nii.gz",
                masks / "REAL01.nii.gz")
    clinical = tmp_path / "clinical.csv"
    pd.DataFrame({"patient_id": ["REAL01"], "time_days": [365], "event": [1], "age": [60]}).to_csv(clinical,
                                                                                                 index=False)
    res = build_manifest(tmp_path / "export", clinical, tmp_path / "out" / "manifest.csv", masks=masks,
                         rules=SelectionRules(min_coverage_mm=30))
    assert res.report.ok, res.report.summary()
    t = load_manifest(res.manifest)
    assert len(t) == 1 and t.loc[0, "mask_labels"] == "totalseg"
    sel = pd.read_csv(res.selection)
    assert "grouped by folder" in sel.loc[0, "reason"] and sel.loc[0, "kernel"] == "Br38f"
    ct = read_ct(t.loc[0, "image_path"])
    assert ct.shape == (20, 512, 512)
    m = read_masks(t.loc[0, "mask_path"], ct, labels="totalseg")
    assert m["vertebrae_T12"].any() and int(np.count_nonzero(m["vertebrae_T12"])) > 100
