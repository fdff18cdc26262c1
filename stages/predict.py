"""`python -m stages.predict PHOTO_OR_FOLDER...`: what the trained model says about your own images.

Prints the top-k class names with probabilities per image, writes them as JSON and CSV, and with --gradcam DIR
an overlay per image showing where the model looked. Images are read as the dataset's are (EXIF rotation, any
mode to RGB, bombs and extreme aspect ratios refused) and go through the model's own eval transform. A file
that cannot be read gets its error in the outputs; the others still run. Exit status: 0 when at least one
image was classified, 1 when none could be.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from stages.cam import cam_overlays, gradcam_target, warn_if_coarse
from stages.checkpoint import Checkpoint, load_checkpoint
from stages.errors import StageError, run_stage
from stages.files import atomic_path, write_csv, write_json
from stages.images import IMAGE_SUFFIXES, ImageRejected, open_image
from stages.paths import MODEL_PATH, PIPELINE_OUTPUT_DIRS
from stages.runtime import Precision, pick_device
from stages.transforms import eval_transform, to_model_input

OVERLAY_SIDE = 320  # px: a GradCAM overlay a person can read, whatever the model's input size


def image_files(paths: list[str]) -> list[Path]:
    """The given files, and the image files (by suffix) under given folders, sorted."""
    files = []
    for given in map(Path, paths):
        if given.is_dir():
            files += sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(given)  # a missing or unreadable file is reported per file, not refused up front
    return files


def check_output(out: str) -> None:
    """Refuses, before any work, an --out that would overwrite a pipeline output or cannot be written."""
    target = Path(out).resolve()
    for folder in PIPELINE_OUTPUT_DIRS:
        if target.is_relative_to(folder.resolve()):
            raise StageError(f"--out {out} is inside {folder}/, where the pipeline keeps its outputs; "
                             f"write predictions elsewhere (default: predictions)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=parent).close()  # a real write: root passes every permission check
    except OSError as error:
        raise StageError(f"--out {out}: {parent} is not writable ({error.strerror}); pick another --out") from None


def predict_files(files: list[Path], model, checkpoint: Checkpoint, top_k: int, device,
                  precision: Precision) -> list[dict]:
    """One row per file: its top-k classes, or the error that kept it from being classified."""
    preprocessing = checkpoint.preprocessing
    transform = eval_transform(preprocessing)
    names = checkpoint.class_names
    k = min(top_k, len(names))
    rows = []
    for path in files:
        try:
            image = transform(open_image(path)).unsqueeze(0)
            with torch.inference_mode(), precision.autocast():
                logits = model(to_model_input(image, device, False, preprocessing.mean, preprocessing.std))
            probs = logits.float().softmax(1)[0].cpu()
        except Exception as error:  # missing, unreadable, refused (bomb, aspect ratio), or failing in the model
            reason = str(error) if isinstance(error, ImageRejected) else f"{type(error).__name__}: {error}"
            rows.append({"file": str(path), "error": reason})
            continue
        top = probs.topk(k)
        rows.append({"file": str(path), "top": [{"class_name": names[i], "probability": round(p, 5)}
                                                for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    return rows


def write_gradcam(files_and_rows: list[tuple[Path, dict]], model, checkpoint: Checkpoint, layer_spec: str,
                  out_dir: Path, device) -> None:
    """One PNG per classified image: the CAM of its top class over the model's input crop, labelled."""
    transform = eval_transform(checkpoint.preprocessing)
    target = gradcam_target(model, layer_spec)
    names = checkpoint.class_names
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, (path, row) in enumerate(files_and_rows):
        image = transform(open_image(path)).unsqueeze(0)
        top_class = names.index(row["top"][0]["class_name"])
        overlays, size = cam_overlays(model, target, image, [top_class], checkpoint.preprocessing, device)
        if index == 0:
            warn_if_coarse(size, checkpoint.preprocessing.resolution, "predict")
        out = out_dir / f"{index:03d}_{path.stem}.png"
        top = row["top"][0]
        with atomic_path(out) as tmp:
            labelled(overlays[0], f"{top['class_name']}  {top['probability']:.1%}").save(tmp, format="PNG")
        row["gradcam"] = str(out)


def labelled(overlay, caption: str) -> Image.Image:
    """The overlay enlarged to OVERLAY_SIDE px (the model's crop can be 64 px) with its top class under it."""
    image = Image.fromarray(overlay)
    scale = OVERLAY_SIDE / image.width
    image = image.resize((OVERLAY_SIDE, round(image.height * scale)), Image.Resampling.BICUBIC)
    font = ImageFont.load_default(size=15)
    lines = textwrap.wrap(caption, 36) or [""]
    canvas = Image.new("RGB", (image.width, image.height + 8 + 20 * len(lines)), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        draw.text((6, image.height + 4 + 20 * number), line, fill="black", font=font)
    return canvas


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="What the trained model says about your own images.")
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", default=str(MODEL_PATH),
                        help=f"a checkpoint of this pipeline (default {MODEL_PATH})")
    parser.add_argument("--top-k", type=positive_int, default=5, help="classes listed per image (default 5)")
    parser.add_argument("--out", default="predictions", help="writes OUT.json and OUT.csv (default predictions)")
    parser.add_argument("--gradcam", metavar="DIR", help="also write a GradCAM overlay PNG per image into DIR")
    parser.add_argument("--gradcam-layer", default="auto", help="module path, as gradcam.target_layer")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                        help="precision: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or none (fp32)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output(args.out)
    if args.gradcam:
        check_output(str(Path(args.gradcam) / "overlay.png"))
    device = pick_device()
    model, checkpoint = load_checkpoint(args.model, device)
    files = image_files(args.images)
    if not files:
        raise StageError(f"no image files in {', '.join(args.images)} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    rows = predict_files(files, model, checkpoint, args.top_k, device, Precision(args.amp, device))
    if args.gradcam:
        classified = [(Path(row["file"]), row) for row in rows if "top" in row]
        write_gradcam(classified, model, checkpoint, args.gradcam_layer, Path(args.gradcam), device)

    for row in rows:
        if "error" in row:
            print(f"{row['file']}: could not read it ({row['error']})")
        else:
            guesses = ", ".join(f"{t['class_name']} {t['probability']:.1%}" for t in row["top"])
            print(f"{row['file']}: {guesses}")
    write_json(Path(f"{args.out}.json"), {"model": args.model, "arch": checkpoint.arch, "images": rows})
    write_csv(Path(f"{args.out}.csv"), [
        {"file": row["file"], "rank": rank + 1, "class_name": top["class_name"], "probability": top["probability"],
         "error": ""} for row in rows if "top" in row for rank, top in enumerate(row["top"])
    ] + [{"file": row["file"], "rank": "", "class_name": "", "probability": "", "error": row["error"]}
         for row in rows if "error" in row], ["file", "rank", "class_name", "probability", "error"])
    failed = sum("error" in row for row in rows)
    print(f"predict: {len(rows) - failed} image(s) classified, {failed} unreadable; wrote {args.out}.json and "
          f"{args.out}.csv" + (f", GradCAM overlays in {args.gradcam}" if args.gradcam else ""))
    return 1 if failed == len(rows) else 0


if __name__ == "__main__":
    run_stage(main)
