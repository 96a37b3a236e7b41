"""Draws the thumbnails of the bundled workflows, ``workflows/<name>.jpg``: ComfyUI's Templates panel shows
``/api/workflow_templates/<pack>/<name>.jpg`` next to each ``workflows/<name>.json`` (frontend 1.58.1).

- Toy workflows: four views of their real result, from the turntable GIF a run of the same settings wrote
  (``make demo`` → ``out/demo/turntable.gif``; ``python -m l2vsd_core generate --prompt "a red cube" --prior toy
  --stages 3 --out out/tmpl_three`` → ``out/tmpl_three/turntable.gif``), enlarged without smoothing.
- Stable Diffusion workflows: a card naming what the workflow does and what it needs. Nothing here has run them
  (no SD weights on the machines this project is built on), so they show no result.

Run from the repo root: ``python docs/make_thumbnails.py [--demo GIF] [--three-stage GIF]``.
"""
import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
CAPTION = 96  # px of caption under the views
BACKGROUND, INK, MUTED = (31, 36, 48), (240, 240, 240), (160, 170, 190)

TOY = {
    "toy_demo": ("Toy demo: 'a red cube'", "L2-VSD NeRF; bundled prior, CPU, minutes"),
    "toy_three_stage": ("Toy three stages: 'a red cube'", "NeRF, DMTet, texture; bundled prior, CPU"),
}
SD = {
    "sd21_stage1": ("SD 2.1: stage 1", ["L2-VSD NeRF, ProlificDreamer's recipe", "25 000 steps, 64 -> 512 px"]),
    "sd21_three_stage": ("SD 2.1: three stages", ["NeRF, DMTet geometry, texture", "ProlificDreamer's recipe"]),
    "sd21_l2esd": ("SD 2.1: L2-ESD", ["stage 1 with ESD's camera-free LoRA mix", "ProlificDreamer's recipe"]),
    "sd21_l2hifa": ("SD 2.1: L2-HiFA", ["stage 1 with HiFA's image-space loss", "ProlificDreamer's recipe"]),
}


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _caption(image: Image.Image, title: str, lines: list, top: int) -> None:
    draw = ImageDraw.Draw(image)
    draw.text((20, top + 12), title, fill=INK, font=_font(28))
    for i, line in enumerate(lines):
        draw.text((20, top + 50 + 24 * i), line, fill=MUTED, font=_font(19))


def toy_thumbnail(gif: Path, title: str, subtitle: str) -> Image.Image:
    """Four views (front, side, back, side) of a turntable, 2 × 2, enlarged by a whole factor, and a caption."""
    source = Image.open(gif)
    frames = []
    for k in range(4):
        source.seek(k * source.n_frames // 4)
        frames.append(source.convert("RGB"))
    w, h = frames[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for k, frame in enumerate(frames):
        grid.paste(frame, ((k % 2) * w, (k // 2) * h))
    side = SIZE - CAPTION
    factor = max(1, side // max(grid.size))
    grid = grid.resize((grid.width * factor, grid.height * factor), Image.NEAREST)
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    image.paste(grid, ((SIZE - grid.width) // 2, (side - grid.height) // 2))
    _caption(image, title, [subtitle], side)
    return image


def sd_card(title: str, lines: list) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((40, 60, SIZE - 40, SIZE - CAPTION - 40), radius=24, outline=MUTED, width=3)
    draw.text((70, 120), "Stable Diffusion 2.1", fill=INK, font=_font(30))
    draw.text((70, 170), "needs SD weights", fill=MUTED, font=_font(22))
    draw.text((70, 200), "(Load Prior or Load Checkpoint)", fill=MUTED, font=_font(22))
    draw.text((70, 240), "and a GPU: hours per prompt", fill=MUTED, font=_font(22))
    _caption(image, title, lines, SIZE - CAPTION)
    return image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="out/demo/turntable.gif")
    parser.add_argument("--three-stage", default="out/tmpl_three/turntable.gif")
    args = parser.parse_args(argv)
    gifs = {"toy_demo": Path(args.demo), "toy_three_stage": Path(args.three_stage)}
    for name, (title, subtitle) in TOY.items():
        toy_thumbnail(gifs[name], title, subtitle).save(ROOT / "workflows" / f"{name}.jpg", quality=90)
    for name, (title, lines) in SD.items():
        sd_card(title, lines).save(ROOT / "workflows" / f"{name}.jpg", quality=90)


if __name__ == "__main__":
    main()
