"""The exported, framework-free model: ONNX or TorchScript export, its reload check against the checkpoint,
serving notes (model.json) and the model card.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from finetune.calibration import Calibration
from finetune.checkpoint import Checkpoint
from finetune.data import ImageSplit, make_loader, open_split
from finetune.lineage import RECORDED_SECTIONS, changed_params, committed_params, flat, format_value, shown_path
from finetune.markdown import markdown_code, markdown_table, markdown_text
from finetune.stats import wilson_interval
from finetune.transforms import Preprocessing, eval_transform, square_side, to_model_input

EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
CHECK_IMAGES = 32
# Relative to the largest logit: float32 on the CPU leaves only summation-order differences, and an
# untrained network's logits can reach 1e11, where an absolute bound means nothing.
RELATIVE_TOLERANCE = 1e-4


class Calibrated(nn.Module):
    """The model with its logits divided by the calibration temperature: what export writes, so that a softmax
    of the exported model's output gives the calibrated probabilities predict prints."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / temperature))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.inverse_temperature


def sample_batch(checkpoint: Checkpoint) -> torch.Tensor:
    """Up to CHECK_IMAGES test images through the model's eval transform, normalized."""
    test, preprocessing = open_split("test"), checkpoint.preprocessing
    loader = make_loader(ImageSplit(test, eval_transform(preprocessing)), min(CHECK_IMAGES, len(test)), workers=0)
    images, _ = next(iter(loader))
    return to_model_input(images, torch.device("cpu"), False, preprocessing.mean, preprocessing.std)


def export_model(model: nn.Module, example: torch.Tensor, export_format: str, path: Path) -> None:
    """Write `model` to `path`, its batch dimension left free (the example only fixes channels and size).
    Written in place, not renamed: ONNX puts the weights of models over 2 GB in a file named after `path`."""
    if export_format == "onnx":
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    verbose=False, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
        # Each node carries the Python stack that made it (this machine's source paths): not for a shipped model
        for graph in (program.model.graph, *program.model.functions.values()):
            for node in graph.all_nodes():
                node.metadata_props.clear()
        program.save(str(path))
    else:
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path))


def load_exported(path: Path, export_format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported model as its users will run it: onnxruntime for ONNX, torch.jit for TorchScript."""
    if export_format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    scripted = torch.jit.load(str(path), map_location="cpu")
    return lambda images: scripted(images)


def compare(expected: torch.Tensor, got: torch.Tensor) -> dict:
    difference = (got - expected).abs().max().item()
    return {"images": len(expected), "max_abs_logit_difference": difference,
            "relative_logit_difference": difference / max(1.0, expected.abs().max().item()),
            "top1_agreement": (got.argmax(1) == expected.argmax(1)).float().mean().item()}


def serving_steps(p: Preprocessing) -> list[str]:
    """Every step predict takes from a file to the model's input, in words exact enough to follow with Pillow and
    numpy alone (tests/test_pipeline.py follows them and matches predict's probabilities within 1e-3)."""
    side = square_side(p.resolution, p.crop_fraction)
    resize = (f"resize to {side}x{side}" if p.resize == "square" else
              f"resize the shorter side to {side} and the longer to int({side} x longer / shorter) (truncated)")
    return [
        f"decode with Pillow: Image.open, then Image.draft(None, ({side}, {side})) (a JPEG is decoded at the "
        f"largest DCT scale, 1/2, 1/4 or 1/8, that keeps both sides at least {side}), then ImageOps.exif_transpose",
        f"if k = min(width // {side}, height // {side}) is 2 or more: Image.reduce(k) (k x k box average)",
        "convert to RGB (transparency composited onto white, 16-bit grey scaled to 8 bits)",
        f"{resize}, {p.interpolation} with antialiasing (Pillow's Image.resize; predict uses torchvision's "
        f"antialiased uint8 resize, which matches it to within a grey level)",
        f"centre crop {p.resolution}x{p.resolution}: left = round((width - {p.resolution}) / 2), top = "
        f"round((height - {p.resolution}) / 2)",
        "float32 pixel values / 255, minus mean, divided by std, per channel; NCHW",
    ]


def serving_notes(checkpoint: Checkpoint, export_format: str) -> dict:
    p = checkpoint.preprocessing
    return {
        "format": export_format, "file": EXPORT_FILES[export_format], "arch": checkpoint.arch,
        "class_names": checkpoint.class_names,
        "input": {"name": "image", "layout": "NCHW float32 RGB", "size": p.resolution, "mean": list(p.mean),
                  "std": list(p.std), "scale": "pixel values / 255 before mean/std", "resize": p.describe(),
                  "resize_mode": p.resize, "resize_to": square_side(p.resolution, p.crop_fraction),
                  "interpolation": p.interpolation, "steps": serving_steps(p)},
        "output": {"name": "logits", "layout": "N x classes, in class_names order; softmax for probabilities",
                   "temperature": checkpoint.calibration.temperature,
                   "calibration": f"the model's logits divided by the temperature "
                                  f"({checkpoint.calibration.describe()}): a softmax of them gives calibrated "
                                  f"probabilities"},
    }


def model_card(checkpoint: Checkpoint, export_format: str, evaluation: dict, data: dict, check: dict) -> str:
    """What a person receiving the model needs to know, in one page."""
    params, p = checkpoint.params, checkpoint.preprocessing
    t, d = params.get("train", {}), params.get("data", {})
    splits = data.get("splits", {})
    names = checkpoint.class_names
    shown = ", ".join(markdown_text(name) for name in names[:20]) + (f", … ({len(names) - 20} more)" if len(names) > 20
                                                                     else "")
    test_images = splits.get("test", {}).get("images", 0)
    metrics = [{"what": "test top-1", "value": with_interval(evaluation["top1"], test_images)}]
    metrics += [{"what": "test top-5", "value": evaluation["top5"]}] if len(names) > 10 else []  # say little with few
    metrics += [{"what": "test mean per-class accuracy", "value": evaluation["mean_class_accuracy"]}]
    metrics += [{"what": "test top-1 with TTA (3 scales x 2 flips)", "value": evaluation["tta"]["top1"]}
                ] if "tta" in evaluation else []
    source, weights = shown_path(str(d.get("source"))), str(params.get("model", {}).get("weights"))
    return "\n\n".join([
        f"# Model card: {checkpoint.arch} fine-tuned on {markdown_text(source)}",
        f"A {checkpoint.arch} image classifier ({len(names)} classes), initialised from "
        f"{markdown_code(shown_path(weights))}"
        + (f" (SHA-256 `{checkpoint.weights_sha256[:16]}`)" if checkpoint.weights_sha256 else "")
        + f" and fine-tuned by this project's "
        f"`dvc repro` (stage `train`, epoch {checkpoint.epoch} of {t.get('epochs')} kept). File: "
        f"`{EXPORT_FILES[export_format]}` ({export_format}); `model.json` beside it holds the class names in output "
        f"order and the input specification.",
        "## Data\n\n" + f"Source: {markdown_code(source)}. Images (train / validation / test): "
        + " / ".join(str(splits[s]["images"]) if s in splits else "-" for s in ("train", "validation", "test"))
        + f". Dropped as unreadable or refused: {data.get('dropped', 0)}; the same image in two splits: "
          f"{data.get('duplicates_across_splits', 0)} ({data.get('test_copies_of_train', 0)} of them test copies of "
          f"train images); under two labels: {data.get('conflicting_labels', 0)}.\n\nClasses: {shown}.",
        "## Results on the test split\n\n" + markdown_table(metrics, {"what": "metric", "value": "value"})
        + f"\n\nThe export was checked against the PyTorch model on {check['images']} test images: top-1 agreement "
          f"{check['top1_agreement']:.0%}, largest logit difference {check['relative_logit_difference']:.1e} of "
          f"the largest logit.",
        recipe_section(params),
        f"## Input\n\nRGB, resized ({p.describe()}, {p.interpolation}), pixel values / 255, then normalised with "
        f"mean {list(p.mean)} and std {list(p.std)}; NCHW float32, any batch size. Output: logits, one per class "
        f"in `class_names` order (softmax for probabilities), already divided by the calibration temperature "
        f"({checkpoint.calibration.describe()}).",
        "## Intended use and limits\n\n"
        f"- Classifying images like those of the training data into its {len(names)} classes. It always answers "
        "with one of them: it cannot say \"none of these\" "
        "by itself: a threshold on the top probability (`predict --min-confidence`) turns low ones into "
        f"\"unknown\". {calibration_line(checkpoint.calibration, evaluation)}\n"
        "- The test figures hold for images drawn like the test split; other cameras, crops, lighting or "
        "classes will score lower. Check it on your own images before relying on it.\n"
        "- Classes with few training images are the least reliable: see `plots/report/report.md` for the "
        "per-class accuracy and the most-confused pairs.\n"
        f"- {inherited_biases(checkpoint.arch, weights)}",
    ]) + "\n"


def with_interval(accuracy: float, images: int) -> str:
    """"81.7% (95% interval 80.8%-82.5%; 8,041 test images)": how far the figure can be trusted (Wilson)."""
    if not images:
        return f"{accuracy:.1%}"
    low, high = wilson_interval(round(accuracy * images), images)
    return f"{accuracy:.1%} (95% interval {low:.1%}-{high:.1%}; {images:,} test images)"


def recipe_section(params: dict) -> str:
    """The params that differ from the last commit's params.yaml (what this run changed), then every param of
    data, model and train: the whole recipe, so the card alone says how the model was made."""
    every = [{"param": key, "value": format_value(value)} for key, value in flat(params, RECORDED_SECTIONS).items()]
    committed, why_not = committed_params()
    if committed is None:
        changed = f"Compared with the committed params.yaml: {why_not}."
    elif rows := changed_params(params, committed, RECORDED_SECTIONS):
        changed = ("Params of this run that differ from the last commit's params.yaml when it was exported:\n\n"
                   + markdown_table([{"param": r["param"], "now": format_value(r["now"]),
                                      "committed": format_value(r["committed"])} for r in rows],
                                    {"param": "param", "now": "this run", "committed": "committed"}))
    else:
        changed = "Every param of this run is the committed params.yaml's."
    return ("## Recipe\n\n" + changed + "\n\n<details><summary>Every param of data, model and train</summary>\n\n"
            + markdown_table(every, {"param": "param", "value": "value"}) + "\n\n</details>")


def calibration_line(calibration: Calibration, evaluation: dict) -> str:
    if not calibration.fitted:
        return f"Its probabilities are {calibration.describe()}."
    return (f"Its probabilities are calibrated ({calibration.describe()}): expected calibration error on the test "
            f"split {evaluation['calibration_error']:.3f} (the report shows the reliability diagram).")


def inherited_biases(arch: str, weights: str) -> str:
    """Where the model's biases come from, by how it was initialised."""
    if weights == "none":
        return ("It was trained from random initialisation, so it inherits the biases of its fine-tuning data "
                "alone (what the training images show and leave out).")
    if weights in ("pretrained", "DEFAULT") and arch.startswith("timm/"):
        return ("It inherits the biases of its pretraining data (the timm weights' own: see their model card on "
                "the Hugging Face hub) and of the fine-tuning data.")
    if Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in weights:
        return (f"It inherits the biases of whatever data the weights in {markdown_code(shown_path(weights))} were "
                f"trained on "
                f"and of the fine-tuning data.")
    return "It inherits the biases of its pretraining data (ImageNet) and of the fine-tuning data."
