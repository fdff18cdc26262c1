"""Stage `export`: models/model.pt in a serving format (export.format), loaded back and checked.

onnx (default): models/export/model.onnx, run by onnxruntime (or TensorRT, OpenVINO...) without PyTorch.
torchscript: models/export/model.torchscript.pt for LibTorch; PyTorch 2.14 deprecates TorchScript.
models/export/MODEL_CARD.md travels with it: data, classes, recipe, test metrics, preprocessing, intended use, limits.
Either way the input is float32 NCHW, already normalized, any batch size, the output the logits divided by the
calibration temperature train fitted (a softmax gives the probabilities predict prints), and
models/export/model.json holds the class names in output order, the input size, mean/std, the resize rule and the
temperature. The export is loaded back by its own runtime and compared with the PyTorch model on a batch of test
images; the largest logit difference and the top-1 agreement go to metrics/export.json, and a mismatch fails the
stage.
"""

from __future__ import annotations

import torch

from finetune.checkpoint import load_checkpoint
from finetune.errors import StageError, run_stage
from finetune.exporting import (
    EXPORT_FILES,
    RELATIVE_TOLERANCE,
    Calibrated,
    compare,
    export_model,
    load_exported,
    model_card,
    sample_batch,
    serving_notes,
)
from finetune.files import atomic_path, read_json, write_json
from finetune.params import load_params
from finetune.paths import DATA_METRICS, EVAL_METRICS, EXPORT_DIR, EXPORT_METRICS, MODEL_PATH


def main() -> None:
    export_format = load_params().export.format
    model, checkpoint = load_checkpoint(MODEL_PATH, "cpu")
    model = Calibrated(model, checkpoint.calibration.temperature).eval()
    batch = sample_batch(checkpoint)
    with torch.inference_mode():
        expected = model(batch)
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    for old_export in EXPORT_DIR.iterdir():  # a half-written or other-format file of an earlier run outside DVC
        old_export.unlink()
    path = EXPORT_DIR / EXPORT_FILES[export_format]
    export_model(model, batch[:2], export_format, path)
    write_json(EXPORT_DIR / "model.json", serving_notes(checkpoint, export_format))

    with torch.inference_mode():
        check = compare(expected, load_exported(path, export_format)(batch))
    write_json(EXPORT_METRICS, check)
    with atomic_path(EXPORT_DIR / "MODEL_CARD.md") as tmp:
        tmp.write_text(model_card(checkpoint, export_format, read_json(EVAL_METRICS, "evaluate"),
                                  read_json(DATA_METRICS, "prepare"), check))
    print(f"export: wrote {path}, {EXPORT_DIR / 'model.json'} and {EXPORT_DIR / 'MODEL_CARD.md'}; reloaded with "
          f"{'onnxruntime' if export_format == 'onnx' else 'torch.jit'} on {len(batch)} test images: max logit "
          f"difference {check['max_abs_logit_difference']:.2e}, top-1 agreement {check['top1_agreement']:.1%}")
    if check["relative_logit_difference"] > RELATIVE_TOLERANCE or check["top1_agreement"] < 1:
        raise StageError(f"the exported model disagrees with models/model.pt (logit difference "
                         f"{check['relative_logit_difference']:.2e} of the largest logit > {RELATIVE_TOLERANCE:g}); "
                         f"do not ship it")


if __name__ == "__main__":
    run_stage(main)
