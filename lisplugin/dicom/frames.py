"""Single frames of stored DICOM instances, read by index without reading the others.

A whole-slide level holds thousands of tiles; decoding it whole costs gigabytes and reading
frame n by iterating over frames 1..n costs seconds. Here the pixel data's place in the file is
found once (the header is parsed without the pixels, then the encapsulated items are indexed by
their 8-byte headers alone), and each frame is read with one seek and decoded by the same code
as every other field (:func:`lisplugin.dicom.decode.iter_fields`).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate

from lisplugin.core.types import Field
from lisplugin.dicom.decode import (
    UnusableInstance,
    _is_wsi_volume,
    _spacing_from_groups,
    iter_fields,
)
from lisplugin.dicom.decode import _spacing_um as _spacing

PIXEL_DATA = 0x7FE00010
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_END = (0xFFFE, 0xE0DD)
#: What a one-frame copy of an instance needs to be decoded like the instance.
_PIXEL_KEYWORDS = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
)


class FrameFile:
    """A stored instance whose frames are read one at a time, by number (from 1)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        with self.path.open("rb") as fp:
            ds = pydicom.dcmread(self.path, defer_size=256)
            element = ds.get_item(PIXEL_DATA, keep_deferred=True)
            if element is None:
                raise UnusableInstance("no pixel data")
            self.header = ds
            self.frames = int(ds.get("NumberOfFrames") or 1)
            self.multi_frame = "NumberOfFrames" in ds
            self.uid = str(ds.SOPInstanceUID).strip()
            self._transfer_syntax = ds.file_meta.TransferSyntaxUID
            start = int(element.value_tell)  # type: ignore[union-attr]
            if element.length == 0xFFFFFFFF:  # type: ignore[union-attr]
                self._spans = _encapsulated_frames(fp, start, self.frames)
            else:
                size = _native_frame_size(ds)
                self._spans = [[(start + i * size, size)] for i in range(self.frames)]
        del ds[PIXEL_DATA]

    def source(self, number: int) -> str:
        return f"{self.uid}#frame={number}" if self.multi_frame else self.uid

    def raw(self, number: int) -> bytes:
        if not 1 <= number <= self.frames:
            raise UnusableInstance(f"instance {self.uid} has no frame {number}")
        parts = []
        with self.path.open("rb") as fp:
            for offset, length in self._spans[number - 1]:
                fp.seek(offset)
                data = fp.read(length)
                if len(data) != length:
                    raise UnusableInstance(f"frame {number} truncated")
                parts.append(data)
        return b"".join(parts)

    def field(self, number: int) -> Field:
        """Frame ``number`` as a field (RGB uint8, the instance's spacing), decoded alone."""
        one = Dataset()
        one.file_meta = FileMetaDataset()
        one.file_meta.TransferSyntaxUID = self._transfer_syntax
        for keyword in (*_PIXEL_KEYWORDS, *_IDENTITY_KEYWORDS):
            if keyword in self.header:
                one[keyword] = self.header[keyword]
        if self._transfer_syntax.is_encapsulated:
            one.PixelData = encapsulate([self.raw(number)])
            one["PixelData"].VR = "OB"
            one["PixelData"].is_undefined_length = True
        else:
            one.PixelData = self.raw(number)
            one["PixelData"].VR = "OB" if int(one.get("BitsAllocated", 8)) <= 8 else "OW"
        field = next(iter_fields(one))
        per_frame = self.header.get("PerFrameFunctionalGroupsSequence") or []
        spacing = _spacing(self.header)
        if number <= len(per_frame):
            spacing = _spacing_from_groups(per_frame[number - 1]) or spacing
        return Field(field.image, self.source(number), spacing)


#: The instance's identity travels with each frame: the decoder checks it like any instance's.
_IDENTITY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _native_frame_size(ds: Dataset) -> int:
    bits = int(ds.get("BitsAllocated") or 8)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    return (pixels * bits + 7) // 8


def _item(fp) -> tuple[tuple[int, int], int]:  # type: ignore[no-untyped-def]
    header = fp.read(8)
    if len(header) < 8:
        raise UnusableInstance("encapsulated pixel data ends early")
    group, element, length = struct.unpack("<HHL", header)
    return (group, element), length


def _encapsulated_frames(fp, start: int, frames: int) -> list[list[tuple[int, int]]]:  # type: ignore[no-untyped-def]
    """(offset, length) of each frame's fragments, from the items' headers alone.

    One fragment per frame (what scanners write) is taken as it is; several fragments per
    frame need the Basic Offset Table to be grouped.
    """
    fp.seek(start)
    tag, length = _item(fp)
    if tag != _ITEM:
        raise UnusableInstance("encapsulated pixel data has no offset table item")
    table = fp.read(length)
    offsets = list(struct.unpack(f"<{length // 4}L", table)) if length else []
    first = fp.tell()
    fragments: list[tuple[int, int, int]] = []  # (item offset from first, value offset, length)
    while True:
        position = fp.tell()
        tag, length = _item(fp)
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM:
            raise UnusableInstance("encapsulated pixel data has a broken item")
        fragments.append((position - first, fp.tell(), length))
        fp.seek(length, 1)
    if len(fragments) == frames:
        return [[(value, length)] for _, value, length in fragments]
    if len(offsets) != frames:
        raise UnusableInstance(f"{len(fragments)} fragments for {frames} frames, no offset table")
    spans = []
    for n, begin in enumerate(offsets):
        end = offsets[n + 1] if n + 1 < frames else None
        parts = [(v, k) for at, v, k in fragments if at >= begin and (end is None or at < end)]
        if not parts:
            raise UnusableInstance(f"frame {n + 1} has no fragment")
        spans.append(parts)
    return spans


class WholeSlideLevel:
    """A VL Whole Slide Microscopy VOLUME level as a :class:`lisplugin.core.slide.TiledImage`.

    Tiles come from TILED_FULL frame order (row by row, first focal plane and optical path) or
    from the Plane Position (Slide) of each frame (TILED_SPARSE). The low-resolution view is the
    coarsest other level of the same pyramid where a red cell is still a few pixels across, or
    else this level's own tiles reduced one at a time.
    """

    def __init__(self, frames: FrameFile, low: FrameFile | None = None) -> None:
        ds = frames.header
        self.frames = frames
        self.width = int(ds.get("TotalPixelMatrixColumns") or ds.Columns)
        self.height = int(ds.get("TotalPixelMatrixRows") or ds.Rows)
        self.tile_width, self.tile_height = int(ds.Columns), int(ds.Rows)
        self.pixel_spacing_um = _spacing(ds)
        self.low = low
        self._positions = _tile_positions(ds, self.tile_width, self.tile_height, frames.frames)

    def frame_number(self, column: int, row: int) -> int | None:
        return self._positions.get((column, row))

    def tile(self, column: int, row: int) -> np.ndarray | None:
        number = self.frame_number(column, row)
        if number is None:
            return None
        image = self.frames.field(number).image
        right = min(self.tile_width, self.width - column * self.tile_width)
        bottom = min(self.tile_height, self.height - row * self.tile_height)
        return image[:bottom, :right]

    def tile_source(self, column: int, row: int) -> str:
        number = self.frame_number(column, row)
        return self.frames.source(number or 1)

    def low_resolution(self) -> Iterator[tuple[float, float, float, np.ndarray]]:
        if self.low is not None:
            level = WholeSlideLevel(self.low)
            scale = self.width / level.width
            for (column, row), _ in sorted(level._positions.items()):
                tile = level.tile(column, row)
                if tile is not None:
                    yield (
                        column * level.tile_width * scale,
                        row * level.tile_height * scale,
                        scale,
                        tile,
                    )
            return
        factor = _reduction(self.pixel_spacing_um, self.tile_width)
        for column, row in sorted(self._positions):
            tile = self.tile(column, row)
            if tile is None:
                continue
            small = np.asarray(Image.fromarray(tile).reduce(factor)) if factor > 1 else tile
            x0, y0 = column * self.tile_width, row * self.tile_height
            yield x0, y0, tile.shape[1] / small.shape[1], small


#: Pixels across a red cell (7.5 um) at which the coverage is measured.
LOW_RESOLUTION_RBC_PX = 6.0


def _reduction(spacing_um: float | None, tile: int) -> int:
    rbc_px = 7.5 / spacing_um if spacing_um else 30.0
    return max(1, min(int(rbc_px // LOW_RESOLUTION_RBC_PX), tile // 4))


def _tile_positions(ds: Dataset, tw: int, th: int, frames: int) -> dict[tuple[int, int], int]:
    """(column, row) of every tile -> its frame number (first focal plane and optical path)."""
    width = int(ds.get("TotalPixelMatrixColumns") or ds.Columns)
    height = int(ds.get("TotalPixelMatrixRows") or ds.Rows)
    across, down = -(-width // tw), -(-height // th)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if ds.get("DimensionOrganizationType") == "TILED_FULL" or not per_frame:
        count = min(frames, across * down)
        return {(n % across, n // across): n + 1 for n in range(count)}
    positions: dict[tuple[int, int], int] = {}
    for number, group in enumerate(per_frame, 1):
        try:
            plane = group.PlanePositionSlideSequence[0]
            column = (int(plane.ColumnPositionInTotalImagePixelMatrix) - 1) // tw
            row = (int(plane.RowPositionInTotalImagePixelMatrix) - 1) // th
        except (AttributeError, IndexError, TypeError, ValueError):
            continue
        positions.setdefault((column, row), number)
    return positions


@functools.lru_cache(maxsize=64)
def frame_file(path: str, mtime_ns: int) -> FrameFile:
    """An indexed instance, kept for reuse while the file is unchanged (review station)."""
    del mtime_ns  # part of the key only
    return FrameFile(path)


def read_frame(path: Path | str, number: int) -> Field:
    """One frame of a stored instance, decoded alone (review station, reports)."""
    path = Path(path)
    return frame_file(str(path), path.stat().st_mtime_ns).field(number)


def whole_slide_levels(paths: list[Path], headers: list[Dataset]) -> list[WholeSlideLevel]:
    """The finest VOLUME level of each whole-slide series in ``paths`` (their headers given),
    with the pyramid's coarsest level where a red cell is still a few pixels across as its
    low-resolution view."""
    series: dict[str, list[tuple[int, Path, Dataset]]] = {}
    for path, ds in zip(paths, headers, strict=True):
        if _is_wsi_volume(ds):
            size = int(ds.get("TotalPixelMatrixColumns") or ds.get("Columns") or 0)
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((size, path, ds))
    levels = []
    for members in series.values():
        members.sort(key=lambda m: -m[0])
        finest_size, finest_path, finest_ds = members[0]
        spacing = _spacing(finest_ds)
        rbc_px = 7.5 / spacing if spacing else 30.0
        low = None
        for size, path, _ in members[1:]:
            if rbc_px * size / finest_size >= LOW_RESOLUTION_RBC_PX / 2:
                low = path  # coarser and coarser, as long as red cells stay visible
        levels.append(
            WholeSlideLevel(FrameFile(finest_path), FrameFile(low) if low is not None else None)
        )
    return levels
