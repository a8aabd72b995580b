"""Instances and image files -> RGB uint8 fields, without sockets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import instance, roundtrip_bytes, smear
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    VLWholeSlideMicroscopyImageStorage,
)

from lisplugin.dicom.decode import (
    UnusableInstance,
    field_from_image_file,
    fields_from_dataset,
    validate_identity,
)

PIXELS = smear()
GREY = PIXELS[..., 1]


def test_monochrome2_is_replicated_to_rgb() -> None:
    (field,) = fields_from_dataset(instance(GREY, photometric="MONOCHROME2"))
    assert field.image.shape == (*GREY.shape, 3)
    assert all(np.array_equal(field.image[..., c], GREY) for c in range(3))


def test_monochrome1_is_inverted() -> None:
    (field,) = fields_from_dataset(instance(GREY, photometric="MONOCHROME1"))
    assert np.array_equal(field.image[..., 0], 255 - GREY)


def test_twelve_bit_grey_is_scaled_to_eight_bits() -> None:
    grey12 = GREY.astype(np.uint16) * 16  # 0..4080 of 0..4095
    (field,) = fields_from_dataset(instance(grey12, photometric="MONOCHROME2", bits_stored=12))
    assert np.abs(field.image[..., 0].astype(int) - GREY.astype(int)).max() <= 1


def test_ybr_full_native_is_converted_to_rgb() -> None:
    ybr = convert_color_space(PIXELS, "RGB", "YBR_FULL")
    (field,) = fields_from_dataset(instance(ybr, photometric="YBR_FULL"))
    assert np.abs(field.image.astype(int) - PIXELS.astype(int)).max() <= 2


@pytest.mark.parametrize("lut_bits", [8, 16])
def test_palette_color_is_looked_up(lut_bits: int) -> None:
    indices = (GREY // 64).astype(np.uint8)  # 4 palette entries
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint16)
    ds = instance(indices, photometric="PALETTE COLOR")
    scale, dtype = (257, "<u2") if lut_bits == 16 else (1, "u1")
    for channel, name in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [4, 0, lut_bits])
        data = (palette[:, channel] * scale).astype(dtype).tobytes()
        setattr(ds, f"{name}PaletteColorLookupTableData", data + b"\x00" * (len(data) % 2))
    (field,) = fields_from_dataset(ds)
    assert np.array_equal(field.image, palette[indices].astype(np.uint8))


def test_jpeg2000_with_colour_transforms_decodes_to_rgb() -> None:
    for syntax, photometric, options in (
        (JPEG2000Lossless, "YBR_RCT", {}),
        (JPEG2000, "YBR_ICT", {"j2k_cr": [8]}),
    ):
        ds = instance(PIXELS)
        ds.PhotometricInterpretation = photometric
        ds.compress(syntax, generate_instance_uid=False, **options)
        (field,) = fields_from_dataset(roundtrip_bytes(ds))
        assert np.abs(field.image.astype(float) - PIXELS).mean() <= 3.0, photometric


def test_ybr_ict_outside_jpeg2000_is_refused() -> None:
    ds = instance(PIXELS)
    ds.PhotometricInterpretation = "YBR_ICT"
    with pytest.raises(UnusableInstance, match="YBR_ICT outside a JPEG 2000 syntax"):
        fields_from_dataset(ds)


def test_pixel_spacing_in_micrometres() -> None:
    ds = instance(PIXELS)
    ds.PixelSpacing = [0.0002, 0.0002]
    assert fields_from_dataset(ds)[0].pixel_spacing_um == pytest.approx(0.2)


def test_whole_slide_spacing_from_functional_groups() -> None:
    ds = instance(np.stack([PIXELS, PIXELS]), sop_class=VLWholeSlideMicroscopyImageStorage)
    measures = Dataset()
    measures.PixelSpacing = [0.00025, 0.00025]
    group = Dataset()
    group.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [group]
    fields = fields_from_dataset(ds)
    assert [f.pixel_spacing_um for f in fields] == pytest.approx([0.25, 0.25])
    assert fields[1].source == f"{ds.SOPInstanceUID}#frame=2"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("StudyInstanceUID", None, "missing Study UID"),
        ("SOPInstanceUID", "", "missing SOP Instance UID"),
        ("SOPInstanceUID", "1.2/../x", "malformed SOP Instance UID"),
    ],
)
def test_identity_problems(keyword: str, value: str | None, reason: str) -> None:
    ds = instance(PIXELS)
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    with pytest.raises(UnusableInstance) as caught:
        validate_identity(ds)
    assert caught.value.reason == reason and caught.value.identity


def test_image_files(tmp_path: Path) -> None:
    rgba = np.dstack([PIXELS, np.full(GREY.shape, 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(GREY).save(tmp_path / "grey.jpg")
    Image.fromarray(GREY.astype(np.uint16) * 257).save(tmp_path / "deep.png")

    assert np.array_equal(field_from_image_file(tmp_path / "rgba.png").image, PIXELS)
    grey = field_from_image_file(tmp_path / "grey.jpg")
    assert grey.image.shape == PIXELS.shape and grey.source == str(tmp_path / "grey.jpg")
    assert np.array_equal(field_from_image_file(tmp_path / "deep.png").image[..., 2], GREY)

    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UnusableInstance, match="unreadable image file"):
        field_from_image_file(tmp_path / "notes.txt")


def test_only_the_finest_wsi_volume_level_is_analysed() -> None:
    from pydicom.uid import VLMicroscopicImageStorage, VLWholeSlideMicroscopyImageStorage

    from lisplugin.dicom.decode import analysable

    def wsi(image_type: str, size: int, series: str = "1.2.3") -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.SeriesInstanceUID = series
        ds.ImageType = ["DERIVED", "PRIMARY", image_type, "NONE"]
        ds.TotalPixelMatrixColumns = ds.TotalPixelMatrixRows = size
        return ds

    base, level2 = wsi("VOLUME", 4096), wsi("VOLUME", 1024)
    label, overview, thumbnail = wsi("LABEL", 512), wsi("OVERVIEW", 800), wsi("THUMBNAIL", 256)
    other_slide = wsi("VOLUME", 2048, series="1.2.4")
    field = Dataset()
    field.SOPClassUID = VLMicroscopicImageStorage
    kept = analysable([label, level2, field, base, overview, thumbnail, other_slide])
    assert kept == [field, base, other_slide]
