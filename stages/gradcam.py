"""Stage `gradcam`: where the model looks, as the seeds' eval.py drew it.

plots/gradcam/samples.png  `gradcam.num_samples` random test images
plots/gradcam/worst.png    misclassified test images from the worst classes (one per class, worst first)
Each tile: the GradCAM (grad-cam package) of the predicted class over the image the
model saw, titled with the true and the predicted class names.
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from stages.data import MODEL_PATH, decode_prepared, model_eval_transform, open_split, to_model_input  # noqa: E402
from stages.evaluate import PER_CLASS_CSV, PREDICTIONS_CSV  # noqa: E402
from stages.files import atomic_path, read_csv  # noqa: E402
from stages.model import gradcam_target, load_checkpoint  # noqa: E402
from stages.params import load_params_or_exit  # noqa: E402
from stages.runtime import pick_device  # noqa: E402

OUT_DIR = Path("plots/gradcam")
COLUMNS = 4
BATCH = 16


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


def cam_tiles(model, target, split, rows: list[int], transform, device) -> list[tuple[np.ndarray, int, int]]:
    """(overlay RGB float image, true label, predicted label) per row of the split; target: (layer, reshape)."""
    layer, reshape = target
    tiles = []
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        for start in range(0, len(rows), BATCH):
            batch = [split[i] for i in rows[start:start + BATCH]]
            images = torch.stack([transform(decode_prepared(r["image"]["bytes"])) for r in batch])
            inputs = to_model_input(images, device, channels_last=False)
            with torch.no_grad():
                predicted = model(inputs).argmax(1).tolist()
            heat = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(p) for p in predicted])
            for image, mask, row, pred in zip(images, heat, batch, predicted):
                rgb = image.permute(1, 2, 0).numpy().astype(np.float32) / 255
                tiles.append((show_cam_on_image(rgb, mask, use_rgb=True), row["label"], pred))
    return tiles


def draw_grid(tiles, names: list[str], title: str, path: Path) -> None:
    columns = max(1, min(COLUMNS, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 3.2, rows * 3.7 + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (overlay, true, pred) in zip(axes.flat, tiles):
        ax.imshow(overlay)
        wrap = lambda name: "\n".join(textwrap.wrap(name, 30))  # noqa: E731
        ax.set_title(f"true: {wrap(names[true])}\npred: {wrap(names[pred])}", fontsize=8,
                     color="darkgreen" if true == pred else "firebrick")
    if not tiles:
        axes.flat[0].text(0, 0.5, "no misclassified test images", fontsize=12)
    fig.suptitle(title, fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    params = load_params_or_exit()
    g = params.gradcam
    device = pick_device()
    model, meta = load_checkpoint(MODEL_PATH, device)  # the plain module: grad-cam's hooks miss compiled ones
    try:
        target = gradcam_target(model, g.target_layer)
    except (AttributeError, IndexError, ValueError) as error:
        sys.exit(f"error: gradcam.target_layer '{g.target_layer}' is not a module of {meta['arch']}: {error}")
    test = open_split("test")
    names = meta["class_names"]
    rng = np.random.default_rng(g.seed)
    sample_rows = sorted(rng.choice(len(test), size=min(g.num_samples, len(test)), replace=False).tolist())
    row_of_id = {image_id: row for row, image_id in enumerate(test["id"])}
    worst_ids = worst_misclassified(read_csv(PER_CLASS_CSV), read_csv(PREDICTIONS_CSV), g.num_misclassified, rng)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    resolution, transform = meta["resolution"], model_eval_transform(meta)
    draw_grid(cam_tiles(model, target, test, sample_rows, transform, device), names,
              f"GradCAM on {len(sample_rows)} random test images ({meta['arch']}, {resolution}px)",
              OUT_DIR / "samples.png")
    draw_grid(cam_tiles(model, target, test, [row_of_id[i] for i in worst_ids], transform, device), names,
              f"GradCAM on misclassified images from the {len(worst_ids)} worst classes",
              OUT_DIR / "worst.png")
    print(f"gradcam: wrote {OUT_DIR}/samples.png ({len(sample_rows)} test images) and "
          f"{OUT_DIR}/worst.png ({len(worst_ids)} misclassified)")


if __name__ == "__main__":
    main()
