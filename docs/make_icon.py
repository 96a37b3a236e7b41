"""Draws docs/icon.png, the pack's icon on the Comfy Registry ([tool.comfy] Icon in pyproject.toml): the toy demo's
"a red cube" in isometric view inside the dashed orbit of the cameras that distil it. Square, 256 px (the registry
takes at most 400 × 400). Run from the repo root: ``python docs/make_icon.py``."""
import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE, SCALE = 256, 4  # drawn at 4× and downsampled, for smooth edges
OUT = Path(__file__).resolve().parent / "icon.png"


def main() -> None:
    n = SIZE * SCALE
    image = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((0, 0, n - 1, n - 1), radius=n // 6, fill=(31, 36, 48, 255))

    cx, cy, r = n / 2, n / 2, n * 0.26  # the middle of the cube, its edge length
    dx, dy = r * math.cos(math.pi / 6), r * math.sin(math.pi / 6)

    def p(x, y):
        return (cx + x, cy + y)

    top = [p(0, -2 * dy), p(dx, -dy), p(0, 0), p(-dx, -dy)]
    left = [p(-dx, -dy), p(0, 0), p(0, r), p(-dx, r - dy)]
    right = [p(0, 0), p(dx, -dy), p(dx, r - dy), p(0, r)]

    # the camera orbit: an ellipse around the cube, its back half drawn before the cube, its front half after
    box = (cx - n * 0.40, cy - n * 0.13, cx + n * 0.40, cy + n * 0.13)
    dash = (170, 180, 200, 255)

    def orbit(start, end):
        for a in range(start, end, 12):
            draw.arc(box, a, a + 7, fill=dash, width=SCALE * 3)

    orbit(180, 360)
    draw.polygon(top, fill=(236, 92, 80, 255))
    draw.polygon(left, fill=(186, 50, 44, 255))
    draw.polygon(right, fill=(140, 34, 30, 255))
    orbit(0, 180)
    # one camera on the orbit, looking at the cube
    ax = math.radians(35)
    ex, ey = cx + n * 0.40 * math.cos(ax), cy + n * 0.13 * math.sin(ax)
    s = n * 0.035
    draw.rounded_rectangle((ex - s, ey - s * 0.7, ex + s, ey + s * 0.7), radius=s / 3, fill=(240, 240, 245, 255))

    image.resize((SIZE, SIZE), Image.LANCZOS).save(OUT, optimize=True)


if __name__ == "__main__":
    main()
