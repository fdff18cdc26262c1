"""Stage `gradcam`: where the model looks, as the seeds' eval.py drew it (the seeds: the project's source
documents).

plots/gradcam/samples.png  `gradcam.num_samples` random test images
plots/gradcam/worst.png    misclassified test images from the worst classes (one per class, worst first)
Each tile: the GradCAM (grad-cam package) of the predicted class over the image the model saw, titled with the
true and the predicted class names.
"""

from __future__ import annotations

import numpy as np

from finetune.cam import (
    cam_tiles,
    draw_grid,
    gradcam_target,
    worst_misclassified,
)
from finetune.checkpoint import load_checkpoint
from finetune.data import open_split
from finetune.errors import run_stage
from finetune.files import read_csv
from finetune.params import load_params
from finetune.paths import GRADCAM_DIR, MODEL_PATH, PER_CLASS_CSV, PREDICTIONS_CSV
from finetune.runtime import pick_device


def main() -> None:
    g = load_params().gradcam
    device = pick_device()
    model, checkpoint = load_checkpoint(MODEL_PATH, device)  # the plain module: grad-cam's hooks miss compiled ones
    target = gradcam_target(model, g.target_layer, checkpoint.preprocessing.resolution)
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
