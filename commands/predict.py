"""`python -m commands.predict PHOTO_OR_FOLDER...`: what the trained model says about your own images.

Prints the top-k class names with probabilities per image (calibrated: the model's logits divided by the temperature
train fitted on the validation split), writes them as JSON and CSV, and with --gradcam DIR an overlay per image
showing where the model looked. With --min-confidence P, an image whose top probability is below P is answered
"unknown" (a photo of something the model was never taught): the report's "Confidence" table says what a P costs.
Images are read as the dataset's are (EXIF rotation, any mode to RGB, bombs and extreme aspect ratios refused) by
loader processes (--workers), go through the model's own eval transform and are classified in batches
(--batch-size), with a progress bar. A file that cannot be read gets its error in the outputs; the others still run.
Exit status: 0 when at least one image was classified, 1 when none could be.

The arguments are parsed and checked before torch, timm and grad-cam are imported (seconds): `--help` and a
mistyped option answer at once.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
from pathlib import Path

from commands import int_at_least
from finetune.errors import StageError, run_stage
from finetune.images import IMAGE_SUFFIXES, ImageRejected, check_jpeg_scan, open_header
from finetune.paths import MODEL_PATH, PIPELINE_OUTPUT_DIRS, PROJECT_ROOT

OVERLAY_SIDE = 320  # px: a GradCAM overlay a person can read, whatever the model's input size
CUDA_BATCH, CPU_BATCH = 64, 8  # on the CPU, larger batches were slower (ResNet-50, 2 cores: 32 ran at 0.6x of 8)
UNKNOWN = "unknown"  # the answer below --min-confidence
READ_TIMEOUT_S = 300  # a loader worker silent this long on one batch (a hung network mount): stop, not wait forever


def image_files(paths: list[str]) -> tuple[list[Path], int]:
    """(the given files and the image files (by suffix) under given folders, sorted; how many other files those
    folders held, left out)."""
    files, left_out = [], 0
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file())
            images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
            files += images
            left_out += len(found) - len(images)
        else:
            files.append(given)  # a missing, unreadable or odd file (a FIFO) is reported per file, not refused
    return files, left_out


def protected_folders() -> list[Path]:
    """Where the pipeline keeps its outputs, in the project this module belongs to (not the current folder, which
    may be any), and train.state_dir when params.yaml names another."""
    folders = [PROJECT_ROOT / folder for folder in PIPELINE_OUTPUT_DIRS]
    try:
        from finetune.params import load_params

        state_dir = Path(load_params(PROJECT_ROOT / "params.yaml", look_up_models=False).train.state_dir).expanduser()
        folders.append(state_dir if state_dir.is_absolute() else PROJECT_ROOT / state_dir)
    except (StageError, OSError):  # no or invalid params.yaml: the fixed folders are still refused
        pass
    return folders


def check_output(path: Path, option: str) -> None:
    """Refuses, before any work, an output path that would overwrite a pipeline output, is a folder, or cannot be
    written. option: how the user gave it (`--out X`), for the message."""
    target = path.resolve()
    for folder in protected_folders():
        if target.is_relative_to(folder.resolve()):
            default = " (default: predictions)" if option.startswith("--out") else ""
            raise StageError(f"{option} is inside {folder}, where the pipeline keeps its outputs; write "
                             f"elsewhere{default}")
    if target.is_dir():
        raise StageError(f"{option}: {path} is a folder, where predict writes a file; pick another {option.split()[0]}")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=parent).close()  # a real write: root passes every permission check
    except OSError as error:
        raise StageError(f"{option}: {parent} is not writable ({error.strerror}); pick another "
                         f"{option.split()[0]}") from None


def check_outputs(args: argparse.Namespace) -> None:
    for suffix in (".json", ".csv"):
        check_output(Path(f"{args.out}{suffix}"), f"--out {args.out}")
    if args.gradcam:
        if Path(args.gradcam).exists() and not Path(args.gradcam).is_dir():
            raise StageError(f"--gradcam {args.gradcam} is a file; it takes a folder for the overlays")
        check_output(Path(args.gradcam) / "overlay.png", f"--gradcam {args.gradcam}")


def failure(error: Exception) -> str:
    return str(error) if isinstance(error, ImageRejected) else f"{type(error).__name__}: {error}"


class Photos:
    """A map-style dataset for torch's DataLoader (which needs only __len__ and __getitem__)."""

    # (index, the model's input as uint8 CHW, None) per file, or (index, None, why it could not be read): a bad
    # file is an answer, not an exception, so it never stops a loader worker or the other files.

    def __init__(self, files: list[Path], transform):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = open_header(self.files[index])
            if image.format == "JPEG":  # prepare's rule: corrupt scan data is refused, not classified as grey
                check_jpeg_scan(self.files[index].read_bytes(), image)
            return index, self.transform(image), None
        except Exception as error:  # missing, unreadable, refused (bomb, aspect ratio)
            return index, None, failure(error)


def collate_photos(items: list) -> tuple[list[int], object, list[tuple[int, str]]]:
    """(indices of the read images, their batch (a tensor) or None, [(index, error)] of the others)."""
    import torch

    read = [(index, image) for index, image, error in items if error is None]
    failed = [(index, error) for index, _, error in items if error is not None]
    return [index for index, _ in read], torch.stack([image for _, image in read]) if read else None, failed


def predict_files(files: list[Path], model, checkpoint, top_k: int, device, precision, batch_size: int = 32,
                  workers: int = 0, min_confidence: float = 0.0) -> list[dict]:
    """One row per file, in the files' order: its top-k classes, or the error that kept it from being classified.
    Files are read and transformed by `workers` loader processes, and classified `batch_size` at a time."""
    import torch
    from tqdm import tqdm

    from finetune.data import leave_interrupts_to_the_main_process
    from finetune.transforms import eval_transform

    preprocessing = checkpoint.preprocessing
    names = checkpoint.class_names
    k = min(top_k, len(names))
    loader = torch.utils.data.DataLoader(
        Photos(files, eval_transform(preprocessing)), batch_size=batch_size, num_workers=workers,
        collate_fn=collate_photos, worker_init_fn=leave_interrupts_to_the_main_process,
        prefetch_factor=4 if workers else None, timeout=READ_TIMEOUT_S if workers else 0)
    rows: list[dict] = [{}] * len(files)
    with tqdm(total=len(files), desc="predict", unit="img") as bar:
        for indices, images, failed in loader:
            for index, error in failed:
                rows[index] = {"file": str(files[index]), "error": error}
            if images is not None:
                rows_of_batch = classify(model, images, preprocessing, device, precision, k, names,
                                         checkpoint.calibration.temperature)
                for index, row in zip(indices, rows_of_batch):
                    if "top" in row:
                        best = row["top"][0]
                        row = {"answer": best["class_name"] if best["probability"] >= min_confidence else UNKNOWN,
                               **row}
                    rows[index] = {"file": str(files[index]), **row}
            bar.update(len(indices) + len(failed))
    return rows


def classify(model, images, preprocessing, device, precision, k: int, names: list[str],
             temperature: float = 1.0) -> list[dict]:
    """{"top": [...]} per image of a batch (softmax of logits / temperature), or {"error": ...} for all of them if
    the model fails on it."""
    import torch

    from finetune.transforms import to_model_input

    try:
        with torch.inference_mode(), precision.autocast():
            logits = model(to_model_input(images, device, True, preprocessing.mean, preprocessing.std))
        top = (logits.float() / temperature).softmax(1).cpu().topk(k)
    except Exception as error:  # e.g. CUDA out of memory at a large --batch-size
        return [{"error": failure(error)}] * len(images)
    return [{"top": [{"class_name": names[i], "probability": round(p, 5)} for p, i in zip(values, indices)]}
            for values, indices in zip(top.values.tolist(), top.indices.tolist())]


def write_gradcam(files_and_rows: list[tuple[Path, dict]], model, checkpoint, target, out_dir: Path,
                  device) -> None:
    """One PNG per classified image: the CAM of its top class over the model's input crop, labelled. A file that
    cannot be read again (deleted or changed since it was classified) gets `gradcam_error`; the others go on.
    target: finetune.cam.gradcam_target's (layer, reshape)."""
    from finetune.cam import cam_overlays, warn_if_coarse
    from finetune.files import atomic_path
    from finetune.transforms import eval_transform

    transform = eval_transform(checkpoint.preprocessing)
    names = checkpoint.class_names
    out_dir.mkdir(parents=True, exist_ok=True)
    warned = False
    for index, (path, row) in enumerate(files_and_rows):
        try:
            image = transform(open_header(path)).unsqueeze(0)
        except Exception as error:  # gone, truncated or replaced since it was classified
            row["gradcam_error"] = failure(error)
            continue
        top_class = names.index(row["top"][0]["class_name"])
        overlays, size = cam_overlays(model, target, image, [top_class], checkpoint.preprocessing, device)
        if not warned:
            warn_if_coarse(size, checkpoint.preprocessing.resolution, "predict")
            warned = True
        out = out_dir / f"{index:03d}_{path.stem}.png"
        top = row["top"][0]
        with atomic_path(out) as tmp:
            labelled(overlays[0], f"{top['class_name']}  {top['probability']:.1%}").save(tmp, format="PNG")
        row["gradcam"] = str(out)


def labelled(overlay, caption: str):
    """The overlay enlarged to OVERLAY_SIDE px (the model's crop can be 64 px) with its top class under it."""
    from PIL import Image, ImageDraw, ImageFont

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


positive_int = int_at_least(1)


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1 (got {text!r})") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1 (got {value:g}); 0.5 means 50%")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m commands.predict",
                                     description="What the trained model says about your own images.")
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", default=str(MODEL_PATH),
                        help=f"a checkpoint of this pipeline (default {MODEL_PATH})")
    parser.add_argument("--top-k", type=positive_int, default=5, help="classes listed per image (default 5)")
    parser.add_argument("--out", default="predictions", help="writes OUT.json and OUT.csv (default predictions)")
    parser.add_argument("--min-confidence", type=probability, default=0.0, metavar="P",
                        help="answer \"unknown\" when the top probability is below P, 0-1 (default 0: always the "
                             "top class); the report's Confidence table gives each P's cost on the test split")
    parser.add_argument("--gradcam", metavar="DIR", help="also write a GradCAM overlay PNG per image into DIR")
    parser.add_argument("--gradcam-layer", default="auto", help="module path, as gradcam.target_layer")
    parser.add_argument("--batch-size", type=int_at_least(0), default=0,
                        help=f"images per model call; 0 (default): {CUDA_BATCH} on a GPU, {CPU_BATCH} on the CPU")
    parser.add_argument("--workers", type=int_at_least(-1), default=-1,
                        help="processes reading images; -1 (default): one per core but one, at most 16; 0: none")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                        help="precision: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or none (fp32)")
    return parser.parse_args(argv)


def row_line(row: dict, min_confidence: float) -> str:
    if "error" in row:
        return f"{row['file']}: could not read it ({row['error']})"
    guesses = ", ".join(f"{t['class_name']} {t['probability']:.1%}" for t in row["top"])
    if row["answer"] == UNKNOWN:
        return f"{row['file']}: {UNKNOWN} (below {min_confidence:.0%}; best guesses {guesses})"
    return f"{row['file']}: {guesses}"


def write_results(args: argparse.Namespace, rows: list[dict], checkpoint) -> None:
    """OUT.json (every row, with the model's calibration and the threshold) and OUT.csv (one line per image and
    rank, or per unreadable file)."""
    from finetune.files import write_csv, write_json

    write_json(Path(f"{args.out}.json"), {"model": args.model, "arch": checkpoint.arch,
                                          "calibration": checkpoint.calibration.to_dict(),
                                          "min_confidence": args.min_confidence, "images": rows})
    write_csv(Path(f"{args.out}.csv"), [
        {"file": row["file"], "answer": row["answer"], "rank": rank + 1, "class_name": top["class_name"],
         "probability": top["probability"], "error": ""} for row in rows if "top" in row
        for rank, top in enumerate(row["top"])
    ] + [{"file": row["file"], "answer": "", "rank": "", "class_name": "", "probability": "", "error": row["error"]}
         for row in rows if "error" in row], ["file", "rank", "class_name", "probability", "answer", "error"])


def summary_line(args: argparse.Namespace, rows: list[dict], left_out: int) -> str:
    failed = sum("error" in row for row in rows)
    unknowns = sum(row.get("answer") == UNKNOWN for row in rows)
    cams_failed = sum("gradcam_error" in row for row in rows)
    return (f"predict: {len(rows) - failed} image(s) classified, {failed} unreadable"
            + (f", {unknowns} answered {UNKNOWN} (top probability below --min-confidence {args.min_confidence:g})"
               if args.min_confidence else "")
            + (f", {left_out} file(s) in the folders left out (not image suffixes: "
               f"{', '.join(sorted(IMAGE_SUFFIXES))})" if left_out else "")
            + f"; wrote {args.out}.json and {args.out}.csv"
            + (f", GradCAM overlays in {args.gradcam}" if args.gradcam else "")
            + (f" ({cams_failed} could not be read again for theirs)" if cams_failed else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_outputs(args)
    files, left_out = image_files(args.images)
    if not files:
        raise StageError(f"no image files in {', '.join(args.images)} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})"
                         + (f"; {left_out} other file(s) left out" if left_out else ""))

    import torch

    from finetune.cam import gradcam_target
    from finetune.checkpoint import load_checkpoint
    from finetune.data import resolve_workers
    from finetune.runtime import Precision, pick_device, resolve_threads

    device = pick_device()
    model, checkpoint = load_checkpoint(args.model, device)
    target = (gradcam_target(model, args.gradcam_layer, checkpoint.preprocessing.resolution, "--gradcam-layer")
              if args.gradcam else None)  # a bad layer: before any work
    batch_size = args.batch_size or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)
    workers = resolve_workers(args.workers) if len(files) > batch_size else 0  # a few photos: no start-up cost
    if device.type == "cpu":  # train's rule: the cores the loader workers leave (oversubscribed: 6x slower, measured)
        torch.set_num_threads(resolve_threads("auto", workers))
    model = model.to(memory_format=torch.channels_last)  # measured on the CPU: ResNet-50 +17% (BENCHMARKS.md)
    if args.min_confidence and not checkpoint.calibration.fitted:
        print(f"predict: the model's confidences are {checkpoint.calibration.describe()}; --min-confidence "
              f"thresholds its raw softmax")
    rows = predict_files(files, model, checkpoint, args.top_k, device, Precision(args.amp, device), batch_size,
                         workers, args.min_confidence)
    if args.gradcam:
        classified = [(Path(row["file"]), row) for row in rows if "top" in row]
        write_gradcam(classified, model, checkpoint, target, Path(args.gradcam), device)

    for row in rows:
        print(row_line(row, args.min_confidence))
    write_results(args, rows, checkpoint)
    failed = sum("error" in row for row in rows)
    print(summary_line(args, rows, left_out))
    return 1 if failed == len(rows) else 0


if __name__ == "__main__":
    run_stage(main)
