"""Fonts for the PDF: patient names in any script must print, so the fonts are embedded.

reportlab's base fonts (Helvetica) cover Latin-1 only: "Łukasiewicz", "Nguyễn" or "山田" would
print as boxes. DejaVu Sans (Debian ``fonts-dejavu-core``) covers Latin, Greek, Cyrillic and
Vietnamese; Droid Sans Fallback (``fonts-droid-fallback``, TrueType outlines, which reportlab
can embed, unlike the CFF-based Noto CJK) covers Chinese and Japanese, Nanum Gothic
(``fonts-nanum``) Korean. Text is split into runs and each run is set in the first font that
has its characters.

Without DejaVu no PDF is made (``FontMissing`` names the package); without a fallback font the
PDF is made and says which characters of the patient's name it could not print.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont

#: Where Debian (and most Linux distributions) install the fonts.
FONT_DIRS = (Path("/usr/share/fonts/truetype"), Path("/usr/local/share/fonts"))
#: (registered name, file name, Debian package) of every font the PDF may use.
REGULAR = ("LP-Sans", "dejavu/DejaVuSans.ttf", "fonts-dejavu-core")
BOLD = ("LP-Sans-Bold", "dejavu/DejaVuSans-Bold.ttf", "fonts-dejavu-core")
#: Fallbacks, in the order they are tried.
FALLBACKS = (
    ("LP-CJK", "droid/DroidSansFallbackFull.ttf", "fonts-droid-fallback"),
    ("LP-Hangul", "nanum/NanumGothic.ttf", "fonts-nanum"),
)


class FontMissing(RuntimeError):
    """A font the PDF needs is not installed; the message says which package has it."""


@dataclass(frozen=True)
class Fonts:
    """The registered font names, and the characters each can print."""

    regular: str
    bold: str
    fallbacks: tuple[str, ...]  # the installed ones of FALLBACKS
    _covered: dict[str, frozenset[int]]

    def covers(self, font: str, char: str) -> bool:
        return ord(char) in self._covered[font] or char in "\n\t"

    def runs(self, text: str, font: str | None = None) -> list[tuple[str, str | None]]:
        """``text`` as (run, font) pieces: ``font`` (default regular) where it has the
        characters, else the fallback font, else None (no installed font prints them)."""
        font = font or self.regular
        pieces: list[tuple[str, str | None]] = []
        for char in text:
            chosen: str | None = font
            if not (self.covers(font, char) or not char.strip()):
                chosen = next((f for f in self.fallbacks if self.covers(f, char)), None)
            if pieces and pieces[-1][1] == chosen:
                pieces[-1] = (pieces[-1][0] + char, chosen)
            else:
                pieces.append((char, chosen))
        return pieces

    def unprintable(self, text: str) -> str:
        """The characters of ``text`` no installed font has."""
        return "".join(run for run, font in self.runs(text) if font is None)

    def markup(self, text: object, font: str | None = None) -> str:
        """``text`` escaped for a reportlab Paragraph, with the fallback font where needed."""
        out = []
        base = font or self.regular
        for run, chosen in self.runs(str(text), base):
            escaped = run.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            plain = chosen in (base, None)
            out.append(escaped if plain else f'<font name="{chosen}">{escaped}</font>')
        return "".join(out)


def _find(file: str, dirs: Sequence[Path]) -> Path | None:
    return next((d / file for d in dirs if (d / file).is_file()), None)


def _register(entry: tuple[str, str, str], dirs: Sequence[Path]) -> frozenset[int] | None:
    name, file, _package = entry
    path = _find(file, dirs)
    if path is None:
        return None
    font = TTFont(name, str(path))
    pdfmetrics.registerFont(font)
    return frozenset(font.face.charToGlyph)


@functools.cache
def fonts(dirs: tuple[Path, ...] = FONT_DIRS) -> Fonts:
    """Register the fonts once; ``FontMissing`` when DejaVu Sans is not installed."""
    covered: dict[str, frozenset[int]] = {}
    for entry in (REGULAR, BOLD):
        found = _register(entry, dirs)
        if found is None:
            raise FontMissing(
                f"font {entry[1]} not found under {', '.join(map(str, dirs))}: install the "
                f"Debian package {entry[2]} (make system-deps) to print reports"
            )
        covered[entry[0]] = found
    for entry in FALLBACKS:
        found = _register(entry, dirs)
        if found is not None:
            covered[entry[0]] = found
    pdfmetrics.registerFontFamily(REGULAR[0], normal=REGULAR[0], bold=BOLD[0])
    fallbacks = tuple(name for name, _, _ in FALLBACKS if name in covered)
    return Fonts(REGULAR[0], BOLD[0], fallbacks, covered)
