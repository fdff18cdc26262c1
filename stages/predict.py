"""`python -m stages.predict PHOTO_OR_FOLDER...`: what the trained model says about your own images.

Prints the top-k class names with probabilities per image, writes them as JSON and CSV, and with
--gradcam DIR an overlay per image showing where the model looked. Images go through the same
preparation as the dataset (EXIF rotation, any mode to RGB) and the model's own eval transform.
A file that cannot be read gets its error in the outputs; the others still run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from stages.data import MODEL_PATH, model_eval_transform, to_model_input
from stages.fetch import IMAGE_SUFFIXES
from stages.files import atomic_path, write_csv, write_json
from stages.model import gradcam_target, load_checkpoint
from stages.prepare import to_rgb
from stages.runtime import pick_device


def image_files(paths: list[str]) -> list[Path]:
    """The given files, and the image files (by suffix) under given folders, sorted."""
    files = []
    for given in map(Path, paths):
        if given.is_dir():
            files += sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(given)  # a missing or unreadable file is reported per file, not refused up front
    return files


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def predict_files(files: list[Path], model, meta: dict, top_k: int, device) -> list[dict]:
    transform = model_eval_transform(meta)
    names = meta["class_names"]
    k = min(top_k, len(names))
    rows = []
    for path in files:
        try:
            image = transform(load_rgb(path)).unsqueeze(0)
        except (OSError, ValueError) as error:  # missing, truncated, not an image
            rows.append({"file": str(path), "error": f"{type(error).__name__}: {error}"})
            continue
        with torch.inference_mode():
            probs = model(to_model_input(image, device, channels_last=False)).float().softmax(1)[0].cpu()
        top = probs.topk(k)
        rows.append({"file": str(path), "top": [{"class_name": names[i], "probability": round(p, 5)}
                                                for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    return rows


def write_gradcam(files_and_rows: list[tuple[Path, dict]], model, meta: dict, layer_spec: str, out_dir: Path,
                  device) -> None:
    """One PNG per readable image: the CAM of its top class over the model's input crop."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    transform = model_eval_transform(meta)
    layer, reshape = gradcam_target(model, layer_spec)
    names = meta["class_names"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        for index, (path, row) in enumerate(files_and_rows):
            image = transform(load_rgb(path)).unsqueeze(0)
            target = names.index(row["top"][0]["class_name"])
            heat = cam(input_tensor=to_model_input(image, device, False), targets=[ClassifierOutputTarget(target)])
            rgb = image[0].permute(1, 2, 0).numpy().astype(np.float32) / 255
            overlay = show_cam_on_image(rgb, heat[0], use_rgb=True)
            with atomic_path(out_dir / f"{index:03d}_{path.stem}.png") as tmp:
                Image.fromarray(overlay).save(tmp, format="PNG")
            row["gradcam"] = str(out_dir / f"{index:03d}_{path.stem}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", default=str(MODEL_PATH), help=f"a checkpoint of this pipeline (default {MODEL_PATH})")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--out", default="predictions", help="writes OUT.json and OUT.csv (default predictions)")
    parser.add_argument("--gradcam", metavar="DIR", help="also write a GradCAM overlay PNG per image into DIR")
    parser.add_argument("--gradcam-layer", default="auto", help="module path, as gradcam.target_layer")
    args = parser.parse_args(argv)

    device = pick_device()
    try:
        model, meta = load_checkpoint(args.model, device)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    files = image_files(args.images)
    if not files:
        sys.exit(f"error: no image files in {', '.join(args.images)} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    rows = predict_files(files, model, meta, args.top_k, device)
    if args.gradcam:
        readable = [(Path(row["file"]), row) for row in rows if "top" in row]
        write_gradcam(readable, model, meta, args.gradcam_layer, Path(args.gradcam), device)

    for row in rows:
        if "error" in row:
            print(f"{row['file']}: could not read it ({row['error']})")
        else:
            guesses = ", ".join(f"{t['class_name']} {t['probability']:.1%}" for t in row["top"])
            print(f"{row['file']}: {guesses}")
    write_json(Path(f"{args.out}.json"), {"model": args.model, "arch": meta["arch"], "images": rows})
    write_csv(Path(f"{args.out}.csv"), [
        {"file": row["file"], "rank": rank + 1, "class_name": top["class_name"], "probability": top["probability"],
         "error": ""} for row in rows if "top" in row for rank, top in enumerate(row["top"])
    ] + [{"file": row["file"], "rank": "", "class_name": "", "probability": "", "error": row["error"]}
         for row in rows if "error" in row], ["file", "rank", "class_name", "probability", "error"])
    failed = sum("error" in row for row in rows)
    print(f"predict: {len(rows) - failed} image(s) classified, {failed} unreadable; wrote {args.out}.json and "
          f"{args.out}.csv" + (f", GradCAM overlays in {args.gradcam}" if args.gradcam else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
