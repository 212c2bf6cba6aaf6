"""A test picture drawn with Pillow (sky, sun, hills, a house, text), saved as
JPEG: the chain's input when you have no photo at hand. Any photo works the
same (`python run.py ~/Pictures/cat.jpg`)."""

from __future__ import annotations

import io
import sys

from PIL import Image, ImageDraw


def testcard(width: int = 1024, height: int = 768, quality: int = 90) -> bytes:
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    horizon = int(height * 0.62)
    for y in range(horizon):  # sky: a vertical gradient
        t = y / horizon
        draw.line([(0, y), (width, y)], fill=(int(40 + 120 * t), int(90 + 110 * t), 230))
    draw.ellipse([width * 0.72, height * 0.08, width * 0.86, height * 0.27], fill=(255, 214, 80))
    for dx, h, colour in ((0.0, 0.30, (46, 125, 50)), (0.35, 0.22, (67, 160, 71)),
                          (0.7, 0.26, (56, 142, 60))):
        x0 = int(width * (dx - 0.2))
        draw.pieslice([x0, int(horizon - height * h), x0 + int(width * 0.75),
                       int(horizon + height * h)], 180, 360, fill=colour)
    draw.rectangle([0, horizon, width, height], fill=(104, 159, 56))
    hx, hy = int(width * 0.18), int(horizon - height * 0.05)
    draw.rectangle([hx, hy, hx + 160, hy + 130], fill=(200, 80, 60), outline=(60, 30, 20), width=4)
    draw.polygon([(hx - 15, hy), (hx + 80, hy - 80), (hx + 175, hy)], fill=(120, 50, 40))
    draw.rectangle([hx + 60, hy + 60, hx + 100, hy + 130], fill=(80, 50, 30))
    draw.text((20, height - 40), "jetfleet test card", fill=(255, 255, 255))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "testcard.jpg"
    with open(path, "wb") as f:
        f.write(testcard())
    print(path)
