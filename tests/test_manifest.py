"""Manifest validation: every problem reported at once with row, column and value; CLI exit codes."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from raypipe.cli import main
from raypipe.io.manifest import ManifestError, load_manifest, validate_manifest


def _write(tmp_path: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for r in rows:
        if r.get("image_path") and not str(r["image_path"]).startswith("missing"):
            (tmp_path / r["image_path"]).touch()
    p = tmp_path / name
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def _row(i: int, **kw) -> dict:
    base = dict(patient_id=f"P{i}", study_id=f"S{i}", modality="XR", image_path=f"img/{i}.png",
                time_days=100 + i, event=i % 2, age=70, sex="F", split="train")
    base.update(kw)
    return base


def test_valid_manifest_loads_with_absolute_paths(tmp_path: Path) -> None:
    p = _write(tmp_path, [_row(i) for i in range(4)])
    rep = validate_manifest(p)
    assert rep.ok, rep.summary()
    t = load_manifest(p)
    assert Path(t.loc[0, "image_path"]).is_absolute()
    assert t["event"].tolist() == [0, 1, 0, 1]


def test_every_problem_reported_with_row_column_value(tmp_path: Path) -> None:
    rows = [
        _row(1),
        _row(2, image_path="missing/2.png"),
        _row(3, study_id="S1"),
        _row(4, time_days=0),
        _row(5, event=2),
        _row(6, sex="X"),
        _row(7, age="seventy"),
        _row(8, patient_id="P1", split="test"),
        _row(9, modality="MR"),
    ]
    rep = validate_manifest(_write(tmp_path, rows))
    assert not rep.ok
    found = {(p.row, p.column) for p in rep.problems}
    expected = {(2, "image_path"), (3, "study_id"), (4, "time_days"), (5, "event"), (6, "sex"),
                (7, "age"), (1, "split"), (9, "modality")}
    assert expected <= found, rep.summary()
    text = rep.summary()
    assert "'seventy'" in text and "'X'" in text and "duplicate study" in text and "several splits" in text


def test_column_typo_and_missing_required_column(tmp_path: Path) -> None:
    rows = [_row(1), _row(2)]
    for r in rows:
        r["evnt"] = r.pop("event")
        r["agee"] = r.pop("age")
    rep = validate_manifest(_write(tmp_path, rows))
    msgs = [str(p) for p in rep.problems]
    assert any("'event'" in m and "required column missing" in m and "evnt" in m for m in msgs), msgs
    assert any("agee" in m and "did you mean 'age'" in m for m in msgs), msgs


def test_load_manifest_raises_and_cli_exits_1(tmp_path: Path, capsys) -> None:
    p = _write(tmp_path, [_row(1, time_days=-5)])
    with pytest.raises(ManifestError, match="time must be > 0"):
        load_manifest(p)
    assert main(["validate", str(p)]) == 1
    out = capsys.readouterr().out
    assert "row 1, column 'time_days'" in out and "-5" in out


def test_ct_row_without_masks_warns_and_parquet_manifest(tmp_path: Path) -> None:
    """A CT without mask_path is valid (preprocessing reports it per study) but the summary warns."""
    rows = [_row(1, modality="CT"), _row(2, modality="CT", mask_path="img/m2.nii.gz"), _row(3, modality="XR")]
    (tmp_path / "img").mkdir()
    for name in ("1.png", "2.png", "3.png", "m2.nii.gz"):
        (tmp_path / "img" / name).touch()
    p = tmp_path / "m.parquet"
    pd.DataFrame(rows).to_parquet(p)
    rep = validate_manifest(p)
    assert rep.ok, rep.summary()
    assert rep.warnings == ["1 CT study without mask_path (rows 1): preprocessing skips them (status 'skipped' "
                            "in qc.csv) until vertebra masks are added"]
    assert "warning: 1 CT study without mask_path" in rep.summary()
    rows[1]["mask_path"] = "img/missing.nii.gz"
    pd.DataFrame(rows).to_parquet(p)
    assert [(x.row, x.column) for x in validate_manifest(p).problems] == [(2, "mask_path")]


def test_missing_manifest_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "nope.csv")]) == 1
    assert "manifest not found" in capsys.readouterr().err


def test_docs_manifest_md_lists_every_column_as_the_validator_does() -> None:
    """docs/MANIFEST.md's table and raypipe.io.manifest agree on the columns and on which are required."""
    from raypipe.io.manifest import KNOWN_COLUMNS, REQUIRED_COLUMNS

    text = (Path(__file__).resolve().parents[1] / "docs" / "MANIFEST.md").read_text()
    documented = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[0].endswith("`"):
            documented[cells[0].strip("`")] = cells[1].split()[0]
    assert set(documented) == set(KNOWN_COLUMNS)
    assert {c for c, req in documented.items() if req == "required"} == set(REQUIRED_COLUMNS)
