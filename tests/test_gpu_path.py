"""The CUDA code paths (autocast, channels_last, torch.compile) run on the CPU, where explicit settings apply; the
device choice never falls back to days of CPU training without a word."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import runtime
from finetune.errors import StageError
from finetune.params import parse_params
from finetune.runtime import (
    Precision,
    resolve_channels_last,
    resolve_eval_batch,
    resolve_switch,
    resolve_threads,
    training_device,
)
from finetune.trainer import Trainer
from tests.conftest import (
    REPO,
    copy_of,
    interrupt_after_first_epoch,
    make_project,
    run,
    run_stage,
    shipped_params,
    tiny_params,
    weights,
    with_params,
)

CPU = torch.device("cpu")
FORCED = {"train.compile": True, "train.amp": "bf16", "train.channels_last": True}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a usable GPU")


def test_auto_follows_the_device_and_explicit_settings_apply_on_the_cpu():
    assert Precision("auto", CPU).dtype is None and Precision("none", CPU).name == "fp32"
    bf16 = Precision("bf16", CPU)
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    fp16 = Precision("fp16", CPU)
    assert fp16.scaler.is_enabled() and not bf16.scaler.is_enabled()
    with fp16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    assert resolve_switch("auto", CPU) is False and resolve_switch("auto", torch.device("cuda", 0)) is True
    assert resolve_switch(True, CPU) is True and resolve_switch(False, torch.device("cuda", 0)) is False


def test_channels_last_is_on_by_default_on_every_device_and_eval_batches_fit_the_device():
    assert resolve_channels_last("auto") is True and resolve_channels_last(False) is False
    assert resolve_eval_batch("auto", CPU) == 32 and resolve_eval_batch("auto", torch.device("cuda", 0)) == 256
    assert resolve_eval_batch(100, CPU) == 100


@pytest.mark.parametrize("cores,workers,processes,expected", [(2, 1, 1, 1), (2, 0, 1, 2), (16, 15, 1, 1),
                                                               (16, 4, 1, 12), (16, 3, 2, 5), (2, 4, 1, 1)])
def test_auto_threads_are_the_cores_the_loader_workers_leave(monkeypatch, cores, workers, processes, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert resolve_threads("auto", workers, processes) == expected
    assert resolve_threads(3, workers, processes) == 3


REFAULTS = """
import resource, sys, torch
applied = False
if sys.argv[1] == "keep":
    from finetune.runtime import keep_freed_memory
    applied = keep_freed_memory()
faults = []
for _ in range(6):  # a step's activations: allocated, touched, freed
    torch.ones(64 * 2**20 // 4)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
print(applied, faults[-1] - faults[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_step_memory_is_reused_without_page_faults(monkeypatch):
    """A 64 MB block freed and allocated again 4 times: 16,384 page faults each by default, none once kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    default, kept = (subprocess.run([sys.executable, "-c", REFAULTS, mode], cwd=REPO, env=env, capture_output=True,
                                    text=True, check=True).stdout.split() for mode in ("default", "keep"))
    assert default[0] == "False" and int(default[1]) >= 4 * 16_000
    assert kept[0] == "True" and int(kept[1]) < 1_000
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert runtime.keep_freed_memory() is False  # the user's malloc settings win


@no_gpu
def test_cuda_asked_for_without_a_gpu_is_refused_with_the_reason():
    with pytest.raises(StageError) as caught:
        training_device("cuda")
    message = str(caught.value)
    assert "no GPU is usable" in message and f"built for CUDA {torch.version.cuda}" in message
    assert "train.device: cpu" in message and "GPU drivers" in message


@no_gpu
def test_auto_falls_back_to_the_cpu_saying_why(capsys):
    assert training_device("auto") == CPU and training_device("cpu") == CPU
    out = capsys.readouterr().out
    assert out.count("no usable GPU") == 1 and "training on the CPU" in out and "NVIDIA driver" in out


def trainer_on_cpu(device_param: str, epochs: int = 90) -> Trainer:
    raw = shipped_params()
    raw["model"].update(arch="resnet18", weights="none")
    raw["train"].update(resolution=32, epochs=epochs, device=device_param)
    return Trainer(parse_params(raw), 3, CPU)


def test_a_cpu_fallback_run_projected_over_two_hours_stops_with_the_fix(capsys):
    """The default run on a machine whose GPU torch cannot use: ~58 h on this CPU. It must not start silently."""
    trainer = trainer_on_cpu("auto")
    with pytest.raises(StageError) as caught:
        trainer.projection.project(seconds=20.0, steps=5, steps_per_epoch=63, epoch=0)  # 4 s per step, 63 x 90 steps
    message = str(caught.value)
    assert "the run would take about 6.3 h (4.00 s per step x 63 steps x 90 epochs)" in message
    assert "more than the 2 h" in message and "train.device: cpu" in message and "GPU drivers" in message
    assert "train: 4.00 s per step: the remaining 90 epoch(s) should take 6.3 h on cpu" in capsys.readouterr().out


def test_the_projection_stops_only_auto_runs_and_only_long_ones(capsys):
    trainer_on_cpu("auto").projection.project(seconds=0.5, steps=5, steps_per_epoch=63, epoch=0)  # 9 min: goes on
    trainer_on_cpu("cpu").projection.project(seconds=50.0, steps=5, steps_per_epoch=63, epoch=0)  # 15.8 h, asked for
    out = capsys.readouterr().out
    assert "should take 9 min on cpu" in out and "should take 15.8 h on cpu" in out


@pytest.mark.slow
def test_forced_gpu_settings_run_the_whole_pipeline_on_the_cpu(tmp_path, image_folder, inductor_cache):
    """compile + bf16 + channels_last through a real `dvc exp run`, with the trainable set changing after the first
    epoch (a recompile), then evaluate, gradcam and export from that model."""
    inductor = inductor_cache
    # bf16 on this CPU at 32 px: see PREPARED_PARAMS. lr 0.01: at tiny_params' 0.05 the unfreezing epoch's loss
    # could jump above the first epoch's and stay there after three (2.02, 4.84, 3.51 in one clean-clone run)
    params = tiny_params(image_folder, **{"train.epochs": 3, "train.freeze_epochs": 1, "train.lr_step_epochs": 3,
                                          "train.resolution": 32, "train.lr": 0.01})
    project = make_project(tmp_path / "project", params)
    result = run(["dvc", "exp", "run", *[arg for key, value in FORCED.items()
                                         for arg in ("-S", f"{key}={str(value).lower()}")]], project)
    log = result.stdout + result.stderr
    for stage in ("train", "evaluate", "gradcam", "export", "report"):
        assert f"Running stage '{stage}'" in log
    assert "(bf16, channels_last, torch.compile (inductor))" in log
    assert "from epoch 2, 62 of 62 parameter tensors train (every layer)" in log
    assert list(inductor.rglob("*.py")), "inductor generated no kernels: nothing was compiled"
    losses = [float(row.split("\t")[-1]) for row in
              (project / "metrics/train/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it learns (3 epochs: no accuracy claim)
    assert 0 <= json.loads((project / "metrics/eval.json").read_text())["top1"] <= 1
    assert json.loads((project / "metrics/export.json").read_text())["top1_agreement"] == 1
    assert (project / "plots/gradcam/samples.png").stat().st_size > 10_000


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """One inductor cache for the file's compiled runs: the first compiles, the others reuse its kernels (each
    into a fresh cache compiled everything again)."""
    cache = tmp_path_factory.mktemp("inductor")
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def run_ok(name: str, cwd: Path) -> str:
    result = run_stage(name, cwd)
    return result.stdout + result.stderr


@pytest.fixture
def compiled_prepared(prepared, tmp_path) -> Path:
    return copy_of(prepared, tmp_path / "compiled", **{"train.epochs": 3, **FORCED})


@pytest.mark.slow
def test_a_compiled_run_killed_after_its_first_epoch_resumes_to_the_same_weights(compiled_prepared, tmp_path):
    whole, killed = compiled_prepared, tmp_path / "killed"
    shutil.copytree(compiled_prepared, killed)
    assert "torch.compile (inductor)" in run_ok("train", whole)
    code, _ = interrupt_after_first_epoch(killed, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert "train: resuming after epoch 1/3" in run_ok("train", killed)
    expected, got = weights(whole), weights(killed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_two_processes_train_with_compile_on(compiled_prepared):
    work = with_params(compiled_prepared, **{"train.devices": 2, "train.epochs": 2, "train.num_threads": "auto"})
    out = run_ok("train", work)
    assert "2 processes x cpu (bf16, channels_last, torch.compile (inductor))" in out
    live = json.loads((work / "metrics/train/metrics.json").read_text())
    assert live["step"] == 2 and 0 < live["train"]["loss"] < 10  # DVCLive's step is the epoch, from 1


def test_gpu_check_says_why_it_cannot_run_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: `make gpu-check` runs for real")
    result = run([sys.executable, "-m", "benchmarks.gpu_check"], REPO, check=False)
    assert result.returncode == 2 and "gpu_check: no usable GPU" in result.stdout
    assert runtime.cuda_unavailable_reason().split(";")[0] in result.stdout



@pytest.mark.parametrize("seconds,shown", [(0, "0:00"), (59.6, "1:00"), (754, "12:34"), (3723, "1:02:03"),
                                           (58 * 3600, "58:00:00")])
def test_the_progress_bar_shows_the_runs_time_left_as_a_clock(seconds, shown):
    from finetune.trainer import format_duration

    assert format_duration(seconds) == shown
