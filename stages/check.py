"""Stage `check`: refuses impossible params before any other stage runs.

DVC deletes a stage's outputs just before running it, so a stage that refused its own params would already
have lost the previous run's model and metrics. Every other stage depends on this one's output, so DVC runs
it first: a bad value passed with `dvc exp run -S ...` stops the run here with the previous results intact.
It checks the params schema (finetune/params.py), then what needs the model but no data and no compute:
that model.arch takes train.resolution, that train.unfreeze_from names one of its modules, and that a local
model.weights file is a state dict that fits it; and what the machine must have: a usable GPU for
train.device: cuda, a C++ compiler for torch.compile on the CPU, a writable train.state_dir, and named
weights in the local cache (downloaded there now if need be). It names the params that differ from the last
commit's params.yaml (an experiment's `-S` values stay in the workspace after it). Its output is one
constant line, so passing the check never makes a later stage re-run.
"""

from __future__ import annotations

from finetune.errors import run_stage
from finetune.files import atomic_path
from finetune.lineage import print_changes
from finetune.params import load_params
from finetune.paths import PARAMS_CHECK
from finetune.preflight import PASSED, check


def main() -> None:
    params = load_params()
    check(params)
    with atomic_path(PARAMS_CHECK) as tmp:
        tmp.write_text(PASSED)
    print("check: params.yaml is valid")
    print_changes(params.model_dump())


if __name__ == "__main__":
    run_stage(main)
