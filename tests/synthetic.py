"""Small learnable image datasets, generated, so the pipeline is tested without the hub.

Each class has its own colour and stripe direction drawn on a noisy background at a
random place and size, so a small CNN trained from scratch learns it in a few epochs.
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class OddFiles:
    """Files that prepare must convert (modes) or drop and list (broken)."""

    converted: dict[str, str]  # file name -> PIL mode it was saved in
    broken: list[str]  # file names that cannot be decoded
    ignored: list[str]  # non-image files


def class_image(label: int, num_classes: int, rng: np.random.Generator) -> Image.Image:
    width, height = int(rng.integers(56, 160)), int(rng.integers(48, 120))
    canvas = rng.normal(200, 25, size=(height, width, 3))
    r, g, b = colorsys.hsv_to_rgb(label / num_classes, 0.9, 0.9)
    box_w, box_h = int(width * rng.uniform(0.5, 0.8)), int(height * rng.uniform(0.5, 0.8))
    x0, y0 = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    yy, xx = np.mgrid[0:box_h, 0:box_w]
    angle = np.pi * label / num_classes
    stripes = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0) > 0)[..., None]
    colour = np.array([r, g, b]) * 255
    noise = rng.normal(0, 12, (box_h, box_w, 3))
    canvas[y0:y0 + box_h, x0:x0 + box_w] = np.where(stripes, colour, colour * 0.4) + noise
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def class_names(num_classes: int) -> list[str]:
    makes = ["Audi A5 Coupe 2012", "Audi S5 Coupe 2012", "BMW M3 Coupe 2012", "Dodge Caliber Wagon 2007",
             "Dodge Caliber Wagon 2012", "Mercedes-Benz Sprinter Van 2012", "Tesla Model S Sedan 2012"]
    return [makes[i] if i < len(makes) else f"Class {i:03d}" for i in range(num_classes)]


def make_image_folder(root: Path, num_classes: int = 6, per_class: dict[str, int] | None = None, seed: int = 0,
                      odd_files: bool = False) -> OddFiles | None:
    """root/split/class name/NNN.jpg for each split in per_class (images per class)."""
    per_class = per_class or {"train": 40, "test": 15}
    rng = np.random.default_rng(seed)
    names = class_names(num_classes)
    for split, count in per_class.items():
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                class_image(label, num_classes, rng).save(folder / f"{i:03d}.jpg", quality=90)
    return add_odd_files(root / "train" / names[0], rng) if odd_files else None


def add_odd_files(folder: Path, rng: np.random.Generator) -> OddFiles:
    base = class_image(0, 6, rng)
    converted = {
        "grey.jpg": "L", "rgba.png": "RGBA", "palette.png": "P", "cmyk.jpg": "CMYK", "deep.png": "I;16",
    }
    base.convert("L").save(folder / "grey.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    deep = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(deep).save(folder / "deep.png")
    full = io.BytesIO()
    base.save(full, format="JPEG")
    (folder / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "not_an_image.jpg").write_text("this is text, not a JPEG")
    (folder / "notes.txt").write_text("a stray note in a class folder")
    return OddFiles(converted=converted, broken=["truncated.jpg", "empty.jpg", "not_an_image.jpg"],
                    ignored=["notes.txt"])
