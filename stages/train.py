"""Stage `train`: fine-tune `model.arch` on the prepared train split; save models/model.pt.

Default recipe (the seeds' run 7, the validated 89.38% Stanford Cars run of the project's source documents):
full fine-tune, one lr for every layer, SGD lr 0.1 momentum 0.9 wd 1e-4, batch 128, 90 epochs, lr /10 every
30, RandomResizedCrop + flip. Other recipes are params (finetune/recipe.py); the epoch loop is
finetune/training.py, one step and one epoch finetune/trainer.py, the resume state finetune/resume.py.

Per epoch DVCLive logs train loss/accuracy, learning rate(s) and images/s, and, when the prepared data has a
validation split, validation loss/accuracy: the best validation epoch is the one kept. Without one the last
epoch is kept. The test split is never read here; it belongs to `evaluate`.
"""

from __future__ import annotations

from finetune import training
from finetune.errors import run_stage
from finetune.params import load_params
from finetune.runtime import relaunch_under_torchrun, under_torchrun


def main() -> None:
    params = load_params()
    if params.train.devices > 1 and not under_torchrun():
        relaunch_under_torchrun("stages.train", params.train.devices)  # does not return
    training.run(params)


if __name__ == "__main__":
    run_stage(main)
