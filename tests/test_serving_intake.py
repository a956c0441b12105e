"""Hostile uploads against the pure intake rules (no Ray): content-only identification, limits before decoding,
bounded JSON, identifiers redacted, options validated. Each case is one finding of issue 17."""
from __future__ import annotations

import gzip
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from raypipe.serving.intake import (
    Limits,
    Redactor,
    check_nifti,
    materialise_masks,
    materialise_study,
    new_budget,
    nifti_header_bytes,
)
from raypipe.serving.options import ServeOptions, check_bind, is_loopback
from raypipe.serving.payloads import check_clinical_ranges, first_non_finite, int_list, loads_bounded
from raypipe.serving.uploads import UploadError, sweep_stale_workdirs

WANTED = {"vertebrae_L1", "vertebrae_L2", "vertebral_body"}


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _zip_named(name: bytes, data: bytes) -> bytes:
    """A stored one-member zip written by hand, so the name can be anything (even empty)."""
    import zlib

    crc = zlib.crc32(data)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0)
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, len(data), len(data),
                          len(name), 0, 0, 0, 0, 0, 0)
    offset = len(local) + len(name) + len(data)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name), offset, 0)
    return local + name + data + central + name + end


def _nifti(tmp: Path, shape=(4, 5, 6), spacing=(1.0, 1.0, 1.0), value: float = 1.0) -> bytes:
    img = sitk.GetImageFromArray(np.full(shape[::-1], value, np.float32))
    img.SetSpacing(spacing)
    p = tmp / "v.nii.gz"
    sitk.WriteImage(img, str(p))
    return p.read_bytes()


def _upload_error(fn, *a, **kw) -> UploadError:
    with pytest.raises(UploadError) as e:
        fn(*a, **kw)
    return e.value


def _study(data: bytes, tmp: Path, limits: Limits | None = None, red: Redactor | None = None) -> Path:
    lim = limits or Limits()
    return materialise_study(data, tmp, lim, red or Redactor(), new_budget(lim))


# ------------------------------------------------------------------------------------------ file identity
@pytest.mark.parametrize("name", ["evil.mhd", "evil.nhdr", "evil.mha", "evil.nrrd"])
def test_header_formats_that_reference_files_are_never_opened(tmp_path: Path, name: str) -> None:
    """A MetaImage/NRRD header naming /etc/passwd as its data is neither DICOM nor NIfTI: skipped, never read."""
    header = b"ObjectType = Image\nNDims = 3\nDimSize = 64 64 64\nElementType = MET_UCHAR\nElementDataFile = /etc/passwd\n"
    if "nrrd" in name or "nhdr" in name:
        header = b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 64 64 64\nencoding: raw\ndata file: /etc/passwd\n"
    e = _upload_error(_study, _zip({name: header}), tmp_path)
    assert e.status == 415 and "content" in e.message
    e = _upload_error(materialise_masks, _zip({name: header, "vertebrae_L1.mhd": header}), tmp_path, "masks", WANTED,
                      Limits(), Redactor(), new_budget(Limits()))
    assert e.status == 422 and list(tmp_path.rglob("*.mhd")) == []


def test_io_readers_refuse_metaimage_named_nifti(tmp_path: Path) -> None:
    """The io layer checks content too: a MetaImage header renamed .nii is not handed to SimpleITK."""
    from raypipe.io.ct import read_ct
    from raypipe.io.errors import ImageReadError

    p = tmp_path / "x.nii"
    p.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementDataFile = /etc/passwd\n")
    with pytest.raises(ImageReadError, match="not a NIfTI"):
        read_ct(p)


def test_nifti_in_zip_is_found_by_content_and_size_checked(tmp_path: Path) -> None:
    nii = _nifti(tmp_path)
    path = _study(_zip({"DOE, JANE/scan.bin": nii}), tmp_path / "w")
    # the study is inflated once, in the same pass that checks its size (the reader does not inflate it again)
    assert path.name == "study.nii" and path.read_bytes() == gzip.decompress(nii)
    e = _upload_error(_study, _zip({"scan.bin": nii}), tmp_path / "w2", Limits(max_voxels=100))
    assert e.status == 413 and "voxels" in e.message


def test_gzip_bomb_stored_in_zip_is_refused(tmp_path: Path) -> None:
    """A NIfTI header promising little, followed by a huge gzip stream stored (not deflated) in the zip."""
    small = gzip.decompress(_nifti(tmp_path))
    bomb = gzip.compress(small + b"\0" * (20 << 20), compresslevel=9)
    e = _upload_error(_study, _zip({"a.nii.gz": bomb}), tmp_path / "w")
    assert e.status == 413


@pytest.mark.parametrize("spacing", [(1e9, 1.0, 1.0), (float("nan"), 1.0, 1.0), (0.0, 1.0, 1.0)])
def test_absurd_nifti_spacing_is_422_before_reading(tmp_path: Path, spacing: tuple) -> None:
    head = bytearray(gzip.decompress(_nifti(tmp_path))[:352])
    struct.pack_into("<3f", head, 80, *spacing)
    e = _upload_error(check_nifti, bytes(head), "study", 10 ** 9)
    assert e.status == 422 and "spacing" in e.message


def test_ct_reader_refuses_absurd_geometry(tmp_path: Path) -> None:
    from raypipe.io.ct import read_ct
    from raypipe.io.errors import ImageReadError

    big = tmp_path / "big.nii.gz"
    big.write_bytes(_nifti(tmp_path, spacing=(500.0, 1.0, 1.0)))
    with pytest.raises(ImageReadError, match="spacing"):
        read_ct(big)
    wide = tmp_path / "wide.nii.gz"
    wide.write_bytes(_nifti(tmp_path, shape=(4, 5, 300), spacing=(1.0, 1.0, 10.0)))
    with pytest.raises(ImageReadError, match="field of view"):
        read_ct(wide)


@pytest.mark.parametrize("case", ["empty_name", "clash", "long", "encrypted", "bzip2", "corrupt", "two_series"])
def test_odd_zip_members_are_4xx(tmp_path: Path, shared_data: Path, case: str) -> None:
    dcm = (shared_data / "xray/fo_dicom/GH342.dcm").read_bytes()
    if case == "empty_name":
        data = _zip_named(b"", dcm)
    elif case == "clash":
        data = _zip({"a": dcm, "a/b.dcm": dcm})
    elif case == "long":
        data = _zip({"x" * 300 + "/y.dcm": dcm})
    elif case == "bzip2":
        data = _zip({"a.dcm": dcm}, zipfile.ZIP_BZIP2)
    elif case == "corrupt":
        raw = bytearray(_zip({"a.dcm": dcm * 3}, zipfile.ZIP_DEFLATED))
        raw[60:400] = b"\xff" * 340
        data = bytes(raw)
    elif case == "encrypted":
        raw = bytearray(_zip({"a.dcm": dcm}))
        raw[6] |= 0x1  # general purpose flag in the local header
        cd = raw.rfind(b"PK\x01\x02")
        raw[cd + 8] |= 0x1  # and in the central directory
        data = bytes(raw)
    else:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(dcm))
        ds.SeriesInstanceUID = "1.2.3.4"
        other = io.BytesIO()
        ds.save_as(other)
        data = _zip({"a.dcm": dcm, "b.dcm": other.getvalue()})
    try:
        _study(data, tmp_path / "w")
    except UploadError as e:
        assert 400 <= e.status < 500 and e.field == "study"
        assert "x" * 300 not in e.message
    else:
        assert case in ("empty_name", "clash", "long")  # member names are never used as paths: these read fine


def test_dicom_series_voxels_checked_before_decoding(tmp_path: Path, shared_data: Path) -> None:
    dcm = (shared_data / "xray/fo_dicom/GH342.dcm").read_bytes()
    e = _upload_error(_study, _zip({f"{i}.dcm": dcm for i in range(3)}), tmp_path, Limits(max_voxels=1000))
    assert e.status == 413 and "voxels" in e.message


def test_identifiers_from_names_and_headers_are_redacted(tmp_path: Path, shared_data: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(shared_data / "xray/fo_dicom/GH342.dcm")
    ds.PatientName, ds.PatientID = "DOE^JANE", "ZZID4711"
    buf = io.BytesIO()
    ds.save_as(buf)
    red = Redactor()
    folder = _study(_zip({"DOE, JANE/IM0001": buf.getvalue()}), tmp_path, red=red)
    assert [p.name for p in folder.iterdir()] == ["00000.dcm"]  # neutral names only
    text = red.redact("failed for DOE^JANE (ZZID4711) in DOE, JANE/IM0001 uid " + str(ds.SOPInstanceUID))
    assert "JANE" not in text and "ZZID4711" not in text and str(ds.SOPInstanceUID) not in text


# ------------------------------------------------------------------------------------------ masks
def test_masks_only_wanted_names_are_written(tmp_path: Path) -> None:
    nii = _nifti(tmp_path)
    members = {"seg/vertebrae_L1.nii.gz": nii, "seg/liver.nii.gz": nii, "seg/vertebrae_L2.NII.GZ": nii}
    lim = Limits()
    folder = materialise_masks(_zip(members), tmp_path / "w", "masks", WANTED, lim, Redactor(), new_budget(lim))
    assert sorted(p.name for p in folder.iterdir()) == ["vertebrae_L1.nii.gz", "vertebrae_L2.nii.gz"]
    e = _upload_error(materialise_masks, _zip({"a/vertebrae_L1.nii.gz": nii, "b/vertebrae_L1.nii.gz": nii}),
                      tmp_path / "w2", "masks", WANTED, lim, Redactor(), new_budget(lim))
    assert e.status == 422 and "twice" in e.message


def test_mask_reader_refuses_nan_geometry(tmp_path: Path) -> None:
    assert nifti_header_bytes(b"hello") is None and nifti_header_bytes(_nifti(tmp_path)) is not None


# ------------------------------------------------------------------------------------------ JSON and form values
@pytest.mark.parametrize("raw", ["[" * 5000 + "]" * 5000, '{"a": ' + "9" * 5000 + "}", '{"age": 1e999}',
                                 '{"age": NaN}', '{"\\ud800": 1}', '{"a": "\\udc80"}', b'{"a": "\xff"}',
                                 '{"a": [[[[[[[[[[1]]]]]]]]]]}', '{"a": 123456789012345678901}'])
def test_hostile_json_is_400(raw: str | bytes) -> None:
    e = _upload_error(loads_bounded, raw, "clinical")
    assert e.status == 400 and e.field == "clinical"


def test_json_within_bounds_decodes() -> None:
    assert loads_bounded('{"age": 71, "sex": "F", "bmi": 23.5}', "clinical") == {"age": 71, "sex": "F", "bmi": 23.5}


@pytest.mark.parametrize("text,status", [("[1e999]", 400), ("²", 400), ("1,x", 400), ("٣", 400), ("0", 422),
                                         ("1," * 20, 422), ("[true]", 400), ("9" * 600, 413)])
def test_int_lists(text: str, status: int) -> None:
    e = _upload_error(int_list, text, "years", 1, 20, 10)
    assert e.status == status and e.field == "years"
    assert int_list("1, 5,10", "years", 1, 20, 10) == [1, 5, 10] and int_list("[2]", "years", 1, 20, 10) == [2]


def test_clinical_ranges_and_non_finite_responses() -> None:
    assert _upload_error(check_clinical_ranges, {"age": 1e300}, ).status == 422
    assert check_clinical_ranges({"age": 71, "sex": "F"}) == {"age": 71, "sex": "F"}
    assert first_non_finite({"a": [1.0, {"b": float("nan")}]}) == "a[1].b"
    assert first_non_finite({"a": [1.0, 2]}) is None


# ------------------------------------------------------------------------------------------ radiographs
def _dicom_with(shared_data: Path, tmp_path: Path, **changes) -> Path:
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(shared_data / "xray/fo_dicom/GH342.dcm")
    for k, v in changes.items():
        if k == "ModalityLUTSequence":
            item = Dataset()
            item.LUTDescriptor = [4096, 0, 12]
            item.add_new(0x00283006, "US", [0, 1, 2])  # LUTData far shorter than the descriptor promises
            ds.ModalityLUTSequence = Sequence([item])
            ds.pop("RescaleSlope", None)
        elif k == "VOILUTSequence":
            ds.VOILUTSequence = Sequence([Dataset()])
        else:
            ds.add_new(k, "LO" if k.startswith("Rescale") else "US", v)  # LO: text where a number belongs
    p = tmp_path / "x.dcm"
    ds.save_as(p)
    return p


@pytest.mark.parametrize("change", [{"RescaleSlope": "abc"}, {"RescaleSlope": "1e999"}, {"ModalityLUTSequence": 1},
                                    {"VOILUTSequence": 1}, {"Rows": 60000}])
def test_bad_radiograph_headers_are_input_errors(shared_data: Path, tmp_path: Path, change: dict) -> None:
    import pydicom

    from raypipe.io.errors import ImageReadError
    from raypipe.io.radiograph import read_radiograph

    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        p = _dicom_with(shared_data, tmp_path, **change)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    with pytest.raises(ImageReadError):
        read_radiograph(p, max_pixels=1 << 24)


# ------------------------------------------------------------------------------------------ options, temp dirs
def test_registry_names_and_bind_address() -> None:
    for bad in ("../x", "a/b", "", ".hidden", "x\n"):
        with pytest.raises(ValueError):
            ServeOptions(names={"ct": bad})
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    check_bind("127.0.0.1", ServeOptions())
    check_bind("0.0.0.0", ServeOptions(api_token="t"))
    check_bind("0.0.0.0", ServeOptions(insecure_no_token=True))
    with pytest.raises(ValueError, match="insecure-no-token"):
        check_bind("0.0.0.0", ServeOptions())


def test_registry_refuses_path_names(tmp_path: Path) -> None:
    from raypipe.registry import RegistryError, list_versions

    with pytest.raises(RegistryError):
        list_versions(tmp_path, "../etc")


def test_stale_workdirs_of_dead_replicas_are_swept(tmp_path: Path) -> None:
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"raypipe-req-{dead.pid}-abc").mkdir()
    (tmp_path / f"raypipe-req-{os.getpid()}-abc").mkdir()
    assert sweep_stale_workdirs(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"raypipe-req-{os.getpid()}-abc"]
