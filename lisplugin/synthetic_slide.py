"""Synthetic whole slides (VL Whole Slide Microscopy, TILED_FULL, JPEG tiles) of any size.

A smear runs left to right from the thick area (red cells piled up) through a monolayer band
(the columns of tiles between ``band[0]`` and ``band[1]`` of the width) to the feathered edge
(a few scattered cells). Tiles are drawn by :func:`lisplugin.synthetic.synthetic_field` (a red
cell about 100 px across, so the spacing is 0.075 um) from a small pool, JPEG-encoded once, and
the file is written item by item: a 32k x 32k slide takes seconds and little memory to make.
A second, 16 times coarser VOLUME level goes beside it, as scanners write pyramids.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid

from lisplugin.synthetic import synthetic_field

TILE = 512
#: Pixel spacing of the synthetic generator's fields (a 7.5 um red cell is ~100 px).
SPACING_UM = 0.075
LOW_FACTOR = 16
#: Leukocytes and red cells of a tile in each part of the smear.
_PARTS = {
    "thick": {"n_rbc": 70, "n_wbc": 1, "n_plt": 2},
    "monolayer": {"n_rbc": 16, "n_wbc": 2, "n_plt": 2},
    "feather": {"n_rbc": 3, "n_wbc": 0, "n_plt": 0},
}
_POOL = 6  # different tiles of each part


@dataclass(frozen=True)
class SyntheticSlide:
    finest: Path
    low: Path
    size: int
    across: int
    band_columns: range  # tile columns of the monolayer band
    leukocytes_per_band_tile: float


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    return data + b"\x00" if len(data) % 2 else data


def part_of(column: int, across: int, band: tuple[float, float]) -> str:
    centre = (column + 0.5) / across
    if centre < band[0]:
        return "thick"
    return "monolayer" if centre <= band[1] else "feather"


def _header(
    size: int, tile: int, frames: int, spacing_mm: float, study: str, series: str, accession: str
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study, "frame of reference"])
    ds.PatientID, ds.PatientName, ds.AccessionNumber = "SLIDE1", "Slide^Synthetic", accession
    ds.Modality = "SM"
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns = ds.TotalPixelMatrixRows = size
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.NumberOfFrames = frames
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 20
    ds.TotalPixelMatrixOriginSequence = [origin]
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = [optical_path]
    measures = Dataset()
    measures.PixelSpacing = [spacing_mm, spacing_mm]
    measures.SliceThickness = 0.004
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _write(path: Path, ds: Dataset, tiles: list[bytes]) -> Path:
    """The header, then Pixel Data as an encapsulated sequence written item by item."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with path.open("wb") as out:
        out.write(buffer.getvalue())
        out.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        out.write(struct.pack("<HHL", 0xFFFE, 0xE000, 0))  # empty Basic Offset Table
        for data in tiles:
            out.write(struct.pack("<HHL", 0xFFFE, 0xE000, len(data)))
            out.write(data)
        out.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return path


def write_synthetic_slide(
    folder: Path,
    size: int,
    band: tuple[float, float] = (0.4, 0.6),
    seed: int = 0,
    accession: str = "SLIDE1",
) -> SyntheticSlide:
    """Write a ``size`` x ``size`` slide (and its coarse level) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    across = -(-size // TILE)
    pool: dict[str, list[np.ndarray]] = {
        part: [
            synthetic_field(seed + 1000 * k + n, TILE, TILE, **counts)[0]  # type: ignore[arg-type]
            for n in range(_POOL)
        ]
        for k, (part, counts) in enumerate(_PARTS.items())
    }
    encoded = {part: [_jpeg(image) for image in images] for part, images in pool.items()}
    study, series = generate_uid(), generate_uid()
    kinds = [part_of(c, across, band) for c in range(across)]
    tiles = [
        encoded[kinds[c]][(r * 7 + c * 3) % _POOL] for r in range(across) for c in range(across)
    ]
    finest = _write(
        folder / "level0.dcm",
        _header(size, TILE, len(tiles), SPACING_UM / 1000, study, series, accession),
        tiles,
    )
    # the coarse level: each tile reduced LOW_FACTOR times, assembled and tiled again
    small = TILE // LOW_FACTOR
    low_size = -(-size // LOW_FACTOR)
    canvas = np.full((across * small, across * small, 3), 255, dtype=np.uint8)
    reduced = {
        part: [np.asarray(Image.fromarray(i).reduce(LOW_FACTOR)) for i in images]
        for part, images in pool.items()
    }
    for r in range(across):
        for c in range(across):
            canvas[r * small : (r + 1) * small, c * small : (c + 1) * small] = reduced[kinds[c]][
                (r * 7 + c * 3) % _POOL
            ]
    low_across = -(-low_size // TILE)
    padded = np.full((low_across * TILE, low_across * TILE, 3), 255, dtype=np.uint8)
    padded[: canvas.shape[0], : canvas.shape[1]] = canvas
    low_tiles = [
        _jpeg(padded[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE])
        for r in range(low_across)
        for c in range(low_across)
    ]
    low = _write(
        folder / "level1.dcm",
        _header(
            low_size, TILE, len(low_tiles), SPACING_UM * LOW_FACTOR / 1000, study, series, accession
        ),
        low_tiles,
    )
    columns = [c for c in range(across) if kinds[c] == "monolayer"]
    return SyntheticSlide(
        finest=finest,
        low=low,
        size=size,
        across=across,
        band_columns=range(columns[0], columns[-1] + 1) if columns else range(0),
        leukocytes_per_band_tile=float(_PARTS["monolayer"]["n_wbc"]),
    )
