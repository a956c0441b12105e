"""Medical image I/O: CT series/NIfTI, masks, radiographs, keypoints, and `inspect`."""

from raypipe.io.ct import CTVolume, read_ct, read_ct_image, read_ct_series_pydicom
from raypipe.io.errors import ImageReadError, ImageReadWarning, KeypointsError, MaskError, RaypipeInputError
from raypipe.io.inspect import detect_kind, format_inspection, inspect_path
from raypipe.io.keypoints import LEVELS, Keypoints, read_keypoints, write_keypoints
from raypipe.io.masks import mask_edge_contact, read_body_mask, read_masks
from raypipe.io.radiograph import Radiograph, read_radiograph, write_radiograph_png

__all__ = [
    "CTVolume",
    "ImageReadError",
    "ImageReadWarning",
    "KeypointsError",
    "Keypoints",
    "LEVELS",
    "MaskError",
    "Radiograph",
    "RaypipeInputError",
    "detect_kind",
    "format_inspection",
    "inspect_path",
    "mask_edge_contact",
    "read_body_mask",
    "read_ct",
    "read_ct_image",
    "read_ct_series_pydicom",
    "read_keypoints",
    "read_masks",
    "read_radiograph",
    "write_keypoints",
    "write_radiograph_png",
]
