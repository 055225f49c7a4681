"""Synthetic desktop-like pictures for the benchmark: wallpaper, windows, text, a photo-like area."""

from __future__ import annotations

import random
import time

from PIL import Image, ImageDraw, ImageFilter

WORDS = (
    "the spice stream agent captures damage encodes bands of sixteen rows and splices "
    "restart intervals so only changed rows cost anything while the rest comes from cache"
).split()


def desktop(width: int, height: int, seed: int = 1) -> Image.Image:
    """An RGB picture that compresses like a busy desktop (text, flat areas, gradients, photo)."""
    rng = random.Random(seed)
    # Wallpaper: a smooth two-colour gradient.
    top = Image.new("RGB", (1, 2), (0, 0, 0))
    top.putpixel((0, 0), (40, 70, 120))
    top.putpixel((0, 1), (120, 60, 90))
    img = top.resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    # Photo-like area: blurred noise gives the high-frequency-but-smooth texture of a picture.
    pw, ph = max(16, width // 3), max(16, height // 3)
    noise = Image.effect_noise((pw, ph), 60).convert("RGB")
    tint = Image.new("RGB", (pw, ph), (rng.randrange(256), rng.randrange(256), 90))
    photo = Image.blend(noise.filter(ImageFilter.GaussianBlur(2)), tint, 0.5)
    img.paste(photo, (width - pw - width // 20, height // 10))
    # Windows with title bars and lines of text.
    for _ in range(4):
        w = rng.randrange(width // 4, width // 2)
        h = rng.randrange(height // 4, height // 2)
        x = rng.randrange(0, max(1, width - w))
        y = rng.randrange(0, max(1, height - h))
        draw.rectangle((x, y, x + w, y + h), fill=(245, 245, 245), outline=(90, 90, 90))
        draw.rectangle((x, y, x + w, y + 24), fill=(60, 90, 150))
        draw.text((x + 8, y + 6), f"Window {rng.randrange(100)}", fill=(255, 255, 255))
        for line in range(y + 32, y + h - 12, 14):
            text = " ".join(rng.choice(WORDS) for _ in range(w // 40))
            draw.text((x + 8, line), text, fill=(20, 20, 20))
    return img


def to_bgrx(img: Image.Image) -> bytes:
    """The picture as X would hold it: B, G, R, X bytes per pixel."""
    r, g, b = img.split()
    return Image.merge("RGBA", (b, g, r, Image.new("L", img.size, 0))).tobytes()


class FixedRate:
    """Sleeps to keep a loop at `rate` iterations per second; a late loop restarts the grid (no burst)."""

    def __init__(self, rate: float) -> None:
        self.period = 1.0 / rate
        self.next_at = time.monotonic()

    def wait(self) -> None:
        self.next_at += self.period
        delay = self.next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            self.next_at = time.monotonic()


# --- markers: a solid square whose colour says which step of the painter drew it -----------------
# 3 bits per channel, levels 32 apart: JPEG at quality 80 keeps a flat 64x64 square within a few
# levels, so a 1/8-scale decode (DC coefficients only) reads the value back exactly.

MARKER_SIZE = 64  # a multiple of 16: whole 4:2:0 MCUs, so the square's centre is pure DC
MARKER_VALUES = 512
MARKER_AT = {"marker": (1024, 512), "fullmarker": (64, 64)}  # top-left corners, multiples of 16
_LEVEL_STEP = 32
_LEVEL_BASE = 16
_LEVEL_SLACK = 10  # a channel further than this from every level is not a marker


def marker_rgb(seq: int) -> tuple[int, int, int]:
    v = seq % MARKER_VALUES
    r, g, b = (_LEVEL_BASE + _LEVEL_STEP * ((v >> shift) & 7) for shift in (6, 3, 0))
    return r, g, b


def marker_pixel(seq: int) -> int:
    """The marker's colour as an X pixel value (24-bit TrueColor, 0xRRGGBB)."""
    r, g, b = marker_rgb(seq)
    return (r << 16) | (g << 8) | b


def marker_value(rgb: tuple[int, int, int]) -> int | None:
    """seq % MARKER_VALUES from a decoded pixel, or None if the colour is not a marker's."""
    value = 0
    for channel in rgb:
        level = round((channel - _LEVEL_BASE) / _LEVEL_STEP)
        if not 0 <= level <= 7 or abs(channel - _LEVEL_BASE - _LEVEL_STEP * level) > _LEVEL_SLACK:
            return None
        value = (value << 3) | level
    return value


# --- typing: pre-rendered glyph cells ------------------------------------------------------------

GLYPH_W, GLYPH_H = 9, 18


def text_cells(text: str, fg=(20, 20, 20), bg=(250, 250, 250)) -> list[bytes]:
    """Each character of text as one GLYPH_W x GLYPH_H cell of BGRX bytes (what a terminal draws)."""
    cells: dict[str, bytes] = {}
    out = []
    for ch in text:
        if ch not in cells:
            img = Image.new("RGB", (GLYPH_W, GLYPH_H), bg)
            ImageDraw.Draw(img).text((1, 3), ch, fill=fg)
            cells[ch] = to_bgrx(img)
        out.append(cells[ch])
    return out


def join_cells(cells: list[bytes]) -> bytes:
    """Cells side by side as one BGRX image len(cells)*GLYPH_W wide."""
    row = GLYPH_W * 4
    return b"".join(cell[y * row:(y + 1) * row] for y in range(GLYPH_H) for cell in cells)
