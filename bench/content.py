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
