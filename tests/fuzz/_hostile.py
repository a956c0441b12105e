"""Seeded generator of hostile HTTP requests for every endpoint of the scoring API (issue 17's classes + mutations).

`hostile_requests(corpus, n, seed)` returns `n` requests as (method, path, httpx keyword arguments, class name).
Everything is built in memory from a small corpus of valid inputs; nothing here talks to the network.
"""
from __future__ import annotations

import gzip
import io
import json
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable

KP = {"L1": [250, 150], "L2": [252, 190], "L3": [254, 230], "L4": [256, 270], "L5": [258, 310]}
CLINICAL = {"age": 71, "sex": "F", "bmi": 23.5}

Request = tuple[str, str, dict[str, Any], str]


@dataclass
class Corpus:
    """Valid inputs the hostile requests are derived from (bytes), plus crafted DICOM variants."""

    ct_nii: bytes  # gzip NIfTI CT
    masks_zip: bytes  # TotalSegmentator folder zipped
    mask_nii: bytes  # one gzip NIfTI mask (member of masks_zip)
    dcm: bytes  # a lateral radiograph (DICOM)
    png: bytes  # a small grey PNG
    dicom_variants: dict[str, bytes]  # bad RescaleSlope, short LUT, huge Rows, identifiers, ...


# ------------------------------------------------------------------------------------------ builders
def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of name -> bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def zip_raw(name: bytes, data: bytes, flags: int = 0, method: int = 0) -> bytes:
    """A one-member zip written by hand: any name (empty, non-UTF-8), any flag bits, any method number."""
    crc = zlib.crc32(data)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, method, 0, 0, crc, len(data), len(data), len(name), 0)
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, flags, method, 0, 0, crc, len(data), len(data),
                          len(name), 0, 0, 0, 0, 0, 0)
    offset = len(local) + len(name) + len(data)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name), offset, 0)
    return local + name + data + central + name + end


def nifti(dims: tuple[int, ...], spacing: tuple[float, ...] = (1.0, 1.0, 1.0), bitpix: int = 16,
          datatype: int = 4, payload: int = 64, gz: bool = True) -> bytes:
    """A NIfTI-1 header declaring `dims`/`spacing`, followed by only `payload` bytes of data."""
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1.0, *spacing, *([1.0] * (7 - len(spacing))))
    struct.pack_into("<f", h, 108, 352.0)
    h[344:348] = b"n+1\0"
    raw = bytes(h) + b"\0" * payload
    return gzip.compress(raw) if gz else raw


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height grey pixels, with one tiny IDAT (a decompression bomb by header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


METAIMAGE = {
    "passwd.mhd": b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementDataFile = /etc/passwd\n",
    "zero.mha": b"ObjectType = Image\nNDims = 3\nDimSize = 4096 4096 4096\nElementType = MET_FLOAT\nElementDataFile = /dev/zero\n",
    "passwd.nhdr": b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 8\nencoding: raw\ndata file: /etc/passwd\n",
    "zero.nrrd": b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4096 4096 4096\nencoding: raw\ndata file: /dev/zero\n",
}

HOSTILE_JSON = [
    "[" * 100000 + "]" * 100000, '{"a":' * 5000 + "1" + "}" * 5000, '{"age": ' + "9" * 5000 + "}", '{"age": 1e999}',
    '{"age": -1e999}', '{"age": NaN}', '{"age": Infinity}', '{"\\ud800": 1}', '{"sex": "\\udfff"}', '{"age": 1e300}',
    '{"age": 123456789012345678901234567890}', '{"bmi": [1, 2]}', '{"bmi": {"x": 1}}', "[]", '"text"', "null", "{",
    '{"age": 71, "sex": "F", "bmi": 1e308}', '{"' + "k" * 100 + '": 1}', '{"age": "\\u0000"}', "\xff\xfe",
    '{"age": 71}' + " " * 10, '{"sex": "X"}', '{"age": true}', '{"a": "' + "x" * 5000 + '"}',
]
HOSTILE_INT_TEXT = ["[1e999]", "[-1e999]", "²", "٣", "1,x", "0", "-1", "1," * 30, "[true]", "[1.5]", "9" * 5000,
                    "[" + "9" * 5000 + "]", "[[1]]", "NaN", "", " ", "1;2", "0x10", "1e3", "99999999999999999999"]
HOSTILE_TEXT = ["maybe", "true" * 1000, "\x00", "../../etc/passwd", "verse\n", "{" * 5000, "totalseg "]


# ------------------------------------------------------------------------------------------ cases
def _mutate(rng: random.Random, data: bytes) -> bytes:
    """One random mutation: bit flips, truncation, insertion, duplication or a spliced region."""
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 32)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b = b[: rng.randint(0, max(0, len(b) - 1))]
    elif kind == 2:
        at = rng.randint(0, len(b))
        b[at:at] = rng.randbytes(rng.randint(1, 512))
    elif kind == 3 and b:
        at = rng.randrange(len(b))
        b[at:at] = b[at: at + rng.randint(1, 4096)]
    elif b:
        at = rng.randrange(len(b))
        b[at: at + 16] = rng.choice([b"\xff" * 16, b"\0" * 16, b"\x7f\xff\xff\xff" * 4])
    return bytes(b)


def _ct(files: dict[str, bytes], data: dict[str, str] | None = None) -> dict[str, Any]:
    return {"files": {k: (f"{k}.bin", v, "application/octet-stream") for k, v in files.items()}, "data": data or {}}


def _xray(image: bytes, data: dict[str, str] | None = None, ctype: str = "application/dicom") -> dict[str, Any]:
    return {"files": {"image": ("image.bin", image, ctype)}, "data": data or {}}


def case_makers(c: Corpus) -> dict[str, Callable[[random.Random], Request]]:
    """Name -> function building one request of that class."""
    good_ct = {"study": c.ct_nii, "masks": c.masks_zip}
    good_xr = {"keypoints": json.dumps(KP), "clinical": json.dumps(CLINICAL)}

    def zip_odd(rng: random.Random) -> bytes:
        return rng.choice([
            zip_raw(b"", c.dcm), zip_raw(b"a/../../b.dcm", c.dcm), zip_raw(b"x" * 300 + b"/y.dcm", c.dcm), zip_raw(b"a.dcm", c.dcm, flags=1), zip_raw(b"a.dcm", c.dcm, method=9),
            zip_raw(b"a.dcm", c.dcm, method=12), zip_raw(b"a.dcm", c.dcm, method=14), zip_raw(b"\xff\xfe.dcm", c.dcm),
            zip_of({"a": c.dcm, "a/b.dcm": c.dcm}), zip_of({"DOE, JANE/IM1": c.dcm, "DOE, JANE/IM2": c.dcm[:500]}),
            zip_of({"vertebrae_L1.nii.gz": c.mask_nii, "x/vertebrae_L1.nii.gz": c.mask_nii}),
            zip_of({f"{i}.dcm": b"x" for i in range(2100)}), zip_raw(b"/etc/passwd", b"x"), zip_raw(b"C:\\x.dcm", b"x"),
            zip_of({"inner.zip": zip_of({"a.dcm": c.dcm})}), _mutate(rng, zip_of({"a.dcm": c.dcm}, zipfile.ZIP_DEFLATED)),
        ])

    def bomb(rng: random.Random) -> bytes:
        small = nifti((8, 8, 8), payload=1024, gz=False)
        return gzip.compress(small + b"\0" * rng.choice([8 << 20, 32 << 20]), compresslevel=1)

    makers: dict[str, Callable[[random.Random], Request]] = {
        # --- file read through header formats
        "ct_metaimage_study": lambda r: ("POST", "/v1/ct/score", _ct({"study": zip_of(dict([r.choice(list(METAIMAGE.items()))])),
                                                                      "masks": c.masks_zip}), ""),
        "ct_metaimage_masks": lambda r: ("POST", "/v1/ct/score", _ct({"study": c.ct_nii, "masks": zip_of(
            {f"vertebrae_L{i}.mhd": METAIMAGE["passwd.mhd"] for i in range(1, 5)} | dict([r.choice(list(METAIMAGE.items()))]))}), ""),
        "ct_metaimage_named_nifti": lambda r: ("POST", "/v1/ct/score", _ct({"study": c.ct_nii, "masks": zip_of(
            {"vertebrae_L1.nii.gz": r.choice(list(METAIMAGE.values())), "vertebrae_L2.nii": METAIMAGE["zero.mha"]})}), ""),
        # --- size limits
        "ct_huge_nifti_header": lambda r: ("POST", "/v1/ct/score", _ct({"study": nifti((r.choice([4096, 30000]), 4096, 512)),
                                                                         "masks": c.masks_zip}), ""),
        "ct_zip_single_huge_nifti": lambda r: ("POST", "/v1/ct/score", _ct({"study": zip_of({"ct.nii.gz": nifti((4096, 4096, 4096))}),
                                                                             "masks": c.masks_zip}), ""),
        "ct_gzip_bomb_in_zip": lambda r: ("POST", "/v1/ct/score", _ct({"study": c.ct_nii, "masks": zip_of(
            {"vertebrae_L1.nii.gz": bomb(r), "vertebrae_L2.nii.gz": c.mask_nii})}), ""),
        "ct_gzip_bomb_study": lambda r: ("POST", "/v1/ct/score", _ct({"study": bomb(r), "masks": c.masks_zip}), ""),
        "ct_absurd_spacing": lambda r: ("POST", "/v1/ct/score", _ct({"study": nifti((8, 8, 8), spacing=(r.choice([1e9, 1e-9, float("nan"), 0.0, -1e30, float("inf")]), 1.0, 1.0), payload=2048),
                                                                     "masks": c.masks_zip}), ""),
        "ct_dicom_huge_rows": lambda r: ("POST", "/v1/ct/score", _ct({"study": zip_of({f"{i}.dcm": c.dicom_variants["huge_rows"] for i in range(3)}),
                                                                       "masks": c.masks_zip}), ""),
        "ct_dicom_frames": lambda r: ("POST", "/v1/ct/score", _ct({"study": zip_of({"a.dcm": c.dicom_variants["many_frames"]}),
                                                                    "masks": c.masks_zip}), ""),
        "ct_odd_zip": lambda r: ("POST", "/v1/ct/score", _ct({"study": zip_odd(r), "masks": r.choice([c.masks_zip, zip_odd(r)])}), ""),
        "ct_body_mask_bad": lambda r: ("POST", "/v1/ct/score", _ct({**good_ct, "body_mask": r.choice([zip_odd(r), bomb(r), nifti((9999, 9999, 99))])}), ""),
        "ct_random_bytes": lambda r: ("POST", "/v1/ct/score", _ct({"study": r.randbytes(r.randint(0, 3000)), "masks": r.randbytes(r.randint(1, 300))}), ""),
        # --- bad values
        "ct_clinical_json": lambda r: ("POST", "/v1/ct/score", _ct(good_ct, {"clinical": r.choice(HOSTILE_JSON)}), ""),
        "ct_mask_labels": lambda r: ("POST", "/v1/ct/score", _ct(good_ct, {"mask_labels": r.choice(HOSTILE_JSON + HOSTILE_TEXT + [
            '{"1": "vertebrae_L1", "' + "9" * 5000 + '": "x"}', '{"-1": "x"}', '{"1": ""}'])}), ""),
        "ct_gradcam": lambda r: ("POST", "/v1/ct/score", _ct(good_ct, {"gradcam": r.choice(HOSTILE_TEXT)}), ""),
        "xr_bad_luts": lambda r: ("POST", "/v1/xray/score", _xray(c.dicom_variants[r.choice(
            ["text_slope", "huge_slope", "short_lut", "empty_voi", "huge_rows", "many_frames", "zero_rows"])], good_xr), ""),
        "xr_png_bomb": lambda r: ("POST", "/v1/xray/score", _xray(png_header_only(r.choice([100000, 65535]), r.choice([100000, 65535])),
                                                                  good_xr, "image/png"), ""),
        "xr_keypoints": lambda r: ("POST", "/v1/xray/score", _xray(c.dcm, {"keypoints": r.choice(HOSTILE_JSON + [
            json.dumps({k: [1e308, 1e308] for k in KP}), json.dumps({k: [10 ** 20, 5] for k in KP}),
            '{"L1": [' + "9" * 5000 + ', 1]}', json.dumps({k: [-5, -5] for k in KP}), json.dumps({"L1": [1, 2]})])}), ""),
        "xr_clinical": lambda r: ("POST", "/v1/xray/score", _xray(c.dcm, {"keypoints": json.dumps(KP), "clinical": r.choice(HOSTILE_JSON)}), ""),
        "xr_random": lambda r: ("POST", "/v1/xray/score", _xray(r.randbytes(r.randint(0, 4000)), good_xr,
                                                                r.choice(["application/dicom", "image/png", "image/jpeg"])), ""),
        "xr_identifiers": lambda r: ("POST", "/v1/xray/score", _xray(_mutate(r, c.dicom_variants["identifiers"]), good_xr), ""),
        "future_years_seeds": lambda r: ("POST", "/v1/xray/future", _xray(c.dcm, {**good_xr, "years": r.choice(HOSTILE_INT_TEXT),
                                                                                  "seeds": r.choice(HOSTILE_INT_TEXT)}), ""),
        "future_age": lambda r: ("POST", "/v1/xray/future", _xray(c.dcm, {**good_xr, "years": "1", "seeds": "1", "clinical": r.choice(
            HOSTILE_JSON + ['{"age": ' + "9" * 400 + ', "sex": "F"}', '{"age": 1e300, "sex": "F"}', '{"age": 70, "sex": "\\ud800"}'])}), ""),
        "future_image": lambda r: ("POST", "/v1/xray/future", _xray(r.choice([png_header_only(99999, 99999), _mutate(r, c.dcm)]),
                                                                    {**good_xr, "years": "1", "seeds": "1"}), ""),
        "jobs_ids": lambda r: ("GET", "/v1/jobs/" + r.choice(["x" * 32, "0" * 31 + "\u0663", "../" * 10, "%00" * 5, "a" * 5000,
                                                              r.randbytes(16).hex(), "%F0%9F%98%80" * 8]), {}, ""),
        "raw_bodies": lambda r: ("POST", r.choice(["/v1/ct/score", "/v1/xray/score", "/v1/xray/future"]), r.choice([
            {"content": r.randbytes(r.randint(0, 2000)), "headers": {"content-type": "multipart/form-data; boundary=abc"}},
            {"content": b'--abc\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n' + r.randbytes(100),
             "headers": {"content-type": "multipart/form-data; boundary=abc"}},
            {"content": b"x" * 100, "headers": {"content-type": "multipart/form-data"}},
            {"content": b"{}", "headers": {"content-type": "application/json"}},
            {"content": b"x", "headers": {"content-type": "multipart/form-data; boundary=" + "b" * 5000}},
            {"files": {f"f{i}": ("x", b"x", "application/octet-stream") for i in range(20)}},
            {"data": {f"d{i}": "x" for i in range(40)}},
        ]), ""),
        "raw_surrogates": lambda r: ("POST", r.choice(["/v1/ct/score", "/v1/xray/score", "/v1/xray/future"]), {
            "content": _multipart(r.choice([b"clinical", b"keypoints", b"years", b"mask_labels", b"\xed\xa0\x80"]),
                                  r.choice([b'{"\xed\xa0\x80": 1}', b"\xed\xa0\x80", b'{"age": "\xed\xb3\xbf"}', b"\xff\xfe\xfd"]),
                                  c.dcm, filename=r.choice([b"x", b"DOE\xed\xa0\x80.dcm", b"\xff" * 300])),
            "headers": {"content-type": "multipart/form-data; boundary=fuzzb"}}, ""),
        "auth_and_methods": lambda r: (r.choice(["GET", "PUT", "DELETE", "PATCH", "POST"]), r.choice(
            ["/v1/models", "/healthz", "/v1/ct/score", "/nope", "/v1/jobs/", "/" + "a" * 3000, "/openapi.json"]),
            {"headers": r.choice([{"authorization": "Bearer wrong"}, {"authorization": ""}, {"authorization": "Basic eA=="},
                                  {"x-request-id": "<script>" * 20}, {}])}, "noauth"),
        # --- generated mutations of valid requests
        "mut_ct": lambda r: ("POST", "/v1/ct/score", _ct({"study": _mutate(r, c.ct_nii) if r.random() < 0.5 else c.ct_nii,
                                                           "masks": _mutate(r, c.masks_zip)}), ""),
        "mut_xray": lambda r: ("POST", "/v1/xray/score", _xray(_mutate(r, r.choice([c.dcm, c.png])), good_xr,
                                                               r.choice(["application/dicom", "image/png"])), ""),
        "mut_json": lambda r: ("POST", "/v1/xray/score", _xray(c.dcm, {"keypoints": _mutate(r, json.dumps(KP).encode()).decode("latin-1"),
                                                                      "clinical": _mutate(r, json.dumps(CLINICAL).encode()).decode("latin-1")}), ""),
    }
    return {k: (lambda f, k=k: (lambda r: _named(f(r), k)))(f) for k, f in makers.items()}


def _multipart(name: bytes, value: bytes, image: bytes, filename: bytes = b"x") -> bytes:
    """A multipart body written byte by byte (so field names and values can be invalid UTF-8 / lone surrogates)."""
    return (b"--fuzzb\r\nContent-Disposition: form-data; name=\"" + name + b"\"\r\n\r\n" + value + b"\r\n"
            b"--fuzzb\r\nContent-Disposition: form-data; name=\"image\"; filename=\"" + filename + b"\"\r\n"
            b"Content-Type: application/dicom\r\n\r\n" + image + b"\r\n--fuzzb--\r\n")


def _named(req: Request, name: str) -> Request:
    method, path, kw, flag = req
    return method, path, kw, name + (":noauth" if flag == "noauth" else "")


def hostile_requests(corpus: Corpus, n: int, seed: int = 0) -> list[Request]:
    """`n` requests cycling through every class (so each appears), each drawn with a seeded RNG."""
    rng = random.Random(seed)
    makers = case_makers(corpus)
    names = sorted(makers)
    return [makers[names[i % len(names)]](rng) for i in range(n)]
