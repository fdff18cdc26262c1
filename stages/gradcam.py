"""Stage `gradcam`: where the model looks, as the seeds' eval.py drew it (the seeds: the project's source
documents).

plots/gradcam/samples.png  `gradcam.num_samples` random test images
plots/gradcam/worst.png    misclassified test images from the worst classes (one per class, worst first)
Each tile: the GradCAM (grad-cam package) of the predicted class over the image the model saw, titled with the
true and the predicted class names.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from stages.cam import cam_overlays, gradcam_target, warn_if_coarse
from stages.checkpoint import load_checkpoint
from stages.data import open_split
from stages.errors import run_stage
from stages.files import atomic_path, read_csv
from stages.params import load_params
from stages.paths import GRADCAM_DIR, MODEL_PATH, PER_CLASS_CSV, PREDICTIONS_CSV
from stages.runtime import pick_device
from stages.transforms import eval_transform, to_model_input

COLUMNS = 3  # 690 px wide: two runs' grids side by side in `dvc plots diff` fit a 1400-px screen
BATCH = 16
TILE_INCHES, DPI = 2.3, 100


def worst_misclassified(per_class: list[dict], predictions: list[dict], count: int,
                        rng: np.random.Generator) -> list[str]:
    """Ids of misclassified test images: one from each class, worst class first."""
    wrong_by_class: dict[str, list[str]] = {}
    for row in predictions:
        if row["actual"] != row["predicted"]:
            wrong_by_class.setdefault(row["actual"], []).append(row["id"])
    chosen = []
    for row in sorted(per_class, key=lambda r: float(r["accuracy"])):
        if len(chosen) == count:
            break
        if wrong := wrong_by_class.get(row["class_name"]):
            chosen.append(wrong[rng.integers(len(wrong))])
    return chosen


def cam_tiles(model, target, split, rows: list[int], checkpoint, device) -> list[tuple[np.ndarray, int, int]]:
    """(overlay RGB image, true label, predicted label) per row of the split; target: (layer, reshape)."""
    transform, preprocessing = eval_transform(checkpoint.preprocessing), checkpoint.preprocessing
    tiles = []
    for start in range(0, len(rows), BATCH):
        batch = [split[i] for i in rows[start:start + BATCH]]
        images = torch.stack([transform(r["image"]["bytes"]) for r in batch])
        with torch.no_grad():
            predicted = model(to_model_input(images, device, False, preprocessing.mean, preprocessing.std)
                              ).argmax(1).tolist()
        overlays, size = cam_overlays(model, target, images, predicted, preprocessing, device)
        if start == 0:
            warn_if_coarse(size, preprocessing.resolution, "gradcam")
        tiles += [(overlay, row["label"], pred) for overlay, row, pred in zip(overlays, batch, predicted)]
    return tiles


def draw_grid(tiles, names: list[str], title: str, path: Path) -> None:
    columns = max(1, min(COLUMNS, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / columns))
    fig = Figure(figsize=(columns * TILE_INCHES, rows * (TILE_INCHES + 0.55) + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (overlay, true, pred) in zip(axes.flat, tiles):
        ax.imshow(overlay)
        # parse_math=False: a class name is literal text; `under_$5_over_$10` is no mathtext formula
        ax.set_title(f"true: {wrap(names[true])}\npred: {wrap(names[pred])}", fontsize=7,
                     color="darkgreen" if true == pred else "firebrick", parse_math=False)
    if not tiles:
        axes.flat[0].text(0, 0.5, "no misclassified test images", fontsize=12)
    fig.suptitle("\n".join(textwrap.wrap(title, 70)), fontsize=9, parse_math=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")


def wrap(name: str) -> str:
    return "\n".join(textwrap.wrap(name, 28))


def main() -> None:
    g = load_params().gradcam
    device = pick_device()
    model, checkpoint = load_checkpoint(MODEL_PATH, device)  # the plain module: grad-cam's hooks miss compiled ones
    target = gradcam_target(model, g.target_layer)
    test = open_split("test")
    names = checkpoint.class_names
    rng = np.random.default_rng(g.seed)
    sample_rows = sorted(rng.choice(len(test), size=min(g.num_samples, len(test)), replace=False).tolist())
    row_of_id = {image_id: row for row, image_id in enumerate(test["id"])}
    worst_ids = worst_misclassified(read_csv(PER_CLASS_CSV), read_csv(PREDICTIONS_CSV), g.num_misclassified, rng)

    GRADCAM_DIR.mkdir(parents=True, exist_ok=True)
    resolution = checkpoint.preprocessing.resolution
    draw_grid(cam_tiles(model, target, test, sample_rows, checkpoint, device), names,
              f"GradCAM on {len(sample_rows)} random test images ({checkpoint.arch}, {resolution}px)",
              GRADCAM_DIR / "samples.png")
    draw_grid(cam_tiles(model, target, test, [row_of_id[i] for i in worst_ids], checkpoint, device), names,
              f"GradCAM on misclassified images from the {len(worst_ids)} worst classes",
              GRADCAM_DIR / "worst.png")
    print(f"gradcam: wrote {GRADCAM_DIR}/samples.png ({len(sample_rows)} test images) and "
          f"{GRADCAM_DIR}/worst.png ({len(worst_ids)} misclassified)")


if __name__ == "__main__":
    run_stage(main)
