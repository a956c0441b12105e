"""Upload safety rules: content types, zip traversal/bombs/too many files, DICOM sniffing, temp cleanup."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from raypipe.serving.uploads import (
    IMAGE_TYPES, UploadError, check_content_type, is_dicom, request_workdir, safe_extract_zip,
)


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_content_type_rules() -> None:
    assert check_content_type("image", "image/png; charset=binary", IMAGE_TYPES) == "image/png"
    with pytest.raises(UploadError) as e:
        check_content_type("image", "text/html", IMAGE_TYPES)
    assert e.value.status == 415 and e.value.field == "image" and "text/html" in e.value.message


@pytest.mark.parametrize("name", ["../evil.dcm", "/etc/passwd", "a/../../b.dcm", "C:/x.dcm"])
def test_zip_path_traversal_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UploadError) as e:
        safe_extract_zip(_zip({name: b"x"}), tmp_path, "study")
    assert e.value.status == 400 and "unsafe path" in e.value.message
    assert list(tmp_path.iterdir()) == []


def test_zip_limits(tmp_path: Path) -> None:
    with pytest.raises(UploadError, match="at most 3 allowed") as e:
        safe_extract_zip(_zip({f"{i}.dcm": b"x" for i in range(5)}), tmp_path, "study", max_files=3)
    assert e.value.status == 413
    bomb = _zip({"a.dcm": b"\0" * 5_000_000}, zipfile.ZIP_DEFLATED)
    with pytest.raises(UploadError, match="zip bomb"):
        safe_extract_zip(bomb, tmp_path, "study")
    with pytest.raises(UploadError, match="not a valid zip"):
        safe_extract_zip(b"PK\x03\x04garbage", tmp_path, "study")


def test_zip_extracts_nested_files(tmp_path: Path) -> None:
    files = safe_extract_zip(_zip({"series/1.dcm": b"a", "series/2.dcm": b"b"}), tmp_path, "study")
    assert sorted(f.read_bytes() for f in files) == [b"a", b"b"]


def test_dicom_sniffing(shared_data: Path) -> None:
    real = (shared_data / "xray" / "pydicom_data" / "RG3_J2KR.dcm").read_bytes()
    no_meta = (shared_data / "xray" / "fo_dicom" / "CR-MONO1-10-chest").read_bytes()
    assert is_dicom(real) and is_dicom(no_meta)
    assert not is_dicom(b"hello world" * 100)
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)


def test_request_workdir_is_removed_even_on_error() -> None:
    with pytest.raises(RuntimeError):
        with request_workdir() as d:
            (d / "f").write_text("x")
            raise RuntimeError("boom")
    assert not d.exists()
