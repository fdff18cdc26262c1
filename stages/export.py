"""Stage `export`: models/model.pt as a TorchScript module for serving without this code, checked.

Writes models/export/model.torchscript.pt (input: float NCHW, already normalized, any batch size) and
models/export/model.json (class names in output order, input size, mean/std, resize rule). The
exported module is loaded back and compared with the PyTorch model on a batch of test images; the
largest logit difference and the top-1 agreement go to metrics/export.json, and a mismatch fails the stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from stages.data import (EVAL_CROP_FRACTION, MODEL_PATH, ImageSplit, make_loader, model_eval_transform, open_split,
                         to_model_input)
from stages.files import atomic_path, write_json
from stages.model import load_checkpoint

EXPORT_DIR = Path("models/export")
SCRIPTED = EXPORT_DIR / "model.torchscript.pt"
EXPORT_METRICS = Path("metrics/export.json")
CHECK_IMAGES = 32
TOLERANCE = 1e-4  # float32 on the same device: only summation-order differences are expected


def sample_batch(meta: dict) -> torch.Tensor:
    """Up to CHECK_IMAGES test images through the model's eval transform, normalized."""
    test = open_split("test")
    loader = make_loader(ImageSplit(test, model_eval_transform(meta)), min(CHECK_IMAGES, len(test)), workers=0)
    images, _ = next(iter(loader))
    return to_model_input(images, torch.device("cpu"), channels_last=False)


def main() -> None:
    model, meta = load_checkpoint(MODEL_PATH, "cpu")
    batch = sample_batch(meta)
    with torch.inference_mode():
        expected = model(batch)
    scripted = torch.jit.trace(model, batch[:2], check_trace=False)
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    with atomic_path(SCRIPTED) as tmp:
        torch.jit.save(scripted, str(tmp))
    write_json(EXPORT_DIR / "model.json", {
        "format": "torchscript", "file": SCRIPTED.name, "arch": meta["arch"], "class_names": meta["class_names"],
        "input": {"layout": "NCHW float32 RGB", "size": meta["resolution"], "mean": meta["mean"], "std": meta["std"],
                  "scale": "pixel values / 255 before mean/std",
                  "resize": (f"{'square' if meta.get('crop') == 'resize_then_crop' else 'shorter side'} to "
                             f"{round(meta['resolution'] / EVAL_CROP_FRACTION)}, centre crop {meta['resolution']}")},
    })

    reloaded = torch.jit.load(str(SCRIPTED), map_location="cpu")
    with torch.inference_mode():
        got = reloaded(batch)
    difference = (got - expected).abs().max().item()
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    write_json(EXPORT_METRICS, {"images": len(batch), "max_abs_logit_difference": difference,
                                "top1_agreement": agreement})
    print(f"export: wrote {SCRIPTED} and {EXPORT_DIR / 'model.json'}; reloaded on {len(batch)} test images: "
          f"max logit difference {difference:.2e}, top-1 agreement {agreement:.1%}")
    if difference > TOLERANCE or agreement < 1:
        sys.exit(f"error: the exported model disagrees with models/model.pt (max logit difference {difference:.2e} > "
                 f"{TOLERANCE:g}); do not ship it")


if __name__ == "__main__":
    main()
