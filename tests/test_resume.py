"""Interrupted training resumes where it stopped, with the same result as a run that was not interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.errors import StageError
from finetune.files import atomic_path
from finetune.params import load_params
from tests.conftest import (
    PREPARED_PARAMS,
    STATE_DIR,
    copy_of,
    curve,
    interrupt_after_first_epoch,
    make_project,
    project_env,
    run,
    run_stage,
    states,
    tiny_params,
    weights,
    with_params,
)

pytestmark = pytest.mark.slow  # real stages, DVC runs or several processes

EPOCHS = PREPARED_PARAMS["train.epochs"]


def the_state(workdir: Path) -> Path:
    (state,) = states(workdir / STATE_DIR)
    return state


def run_ok(name: str, cwd: Path) -> str:
    result = run_stage(name, cwd)
    return result.stdout + result.stderr


@pytest.fixture
def workdir(prepared, tmp_path) -> Path:
    return copy_of(prepared, tmp_path / "run")


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> Path:
    work = copy_of(prepared, tmp_path_factory.mktemp("uninterrupted") / "run")
    run_ok("train", work)
    return work


@pytest.fixture(scope="module")
def killed(prepared, tmp_path_factory) -> tuple[Path, int, str]:
    """One run killed (SIGKILL: a lost machine, no handler runs) once its first epoch's state is saved: the tests
    that need a real state file start from copies of it instead of each training and killing a run."""
    work = copy_of(prepared, tmp_path_factory.mktemp("killed") / "run")
    code, out = interrupt_after_first_epoch(work, signal.SIGKILL)
    return work, code, out


@pytest.fixture
def killed_copy(killed, tmp_path) -> Path:
    return copy_of(killed[0], tmp_path / "run")


def test_killed_run_resumes_to_the_same_weights_and_curves(killed, killed_copy, uninterrupted):
    workdir, (_, code, _) = killed_copy, killed
    assert code == -signal.SIGKILL
    assert not (workdir / "models/model.pt").exists()
    resumed = run_ok("train", workdir)
    assert "train: resuming after epoch" in resumed
    expected, got = weights(uninterrupted), weights(workdir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    for name in ("train/loss.tsv", "train/acc.tsv", "validation/acc.tsv", "lr.tsv"):
        assert curve(workdir, name) == curve(uninterrupted, name)
    assert [step for step, _ in curve(workdir, "train/loss.tsv")] == [str(s) for s in range(1, EPOCHS + 1)]


MODERN_KNOBS = {"ema_decay": 0.9, "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "accumulate_steps": 2,
                "lr_schedule_unit": "step", "warmup_epochs": 1, "layer_decay": 0.8, "grad_clip_norm": 1.0,
                "augment": "randaugment", "random_erasing": 0.25, "hflip": False}


def with_modern_knobs(prepared: Path, dest: Path) -> Path:
    return copy_of(prepared, dest, **{f"train.{key}": value for key, value in MODERN_KNOBS.items()})


def test_killed_run_with_every_modern_knob_resumes_to_the_same_weights(prepared, tmp_path):
    """The EMA, the per-step schedule, the mixing draws and a half-finished accumulation all resume bit-exactly."""
    reference = with_modern_knobs(prepared, tmp_path / "reference")
    run_ok("train", reference)
    workdir = with_modern_knobs(prepared, tmp_path / "killed")
    code, _ = interrupt_after_first_epoch(workdir, signal.SIGKILL)
    assert code == -signal.SIGKILL
    from finetune.files import read_torch
    from finetune.resume import unpack

    assert unpack(read_torch(the_state(workdir)))["ema"]["n_averaged"] > 0
    assert "train: resuming after epoch" in run_ok("train", workdir)
    expected, got = weights(reference), weights(workdir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    for name in ("train/loss.tsv", "validation/acc.tsv", "lr.tsv"):
        assert curve(workdir, name) == curve(reference, name)


def test_state_on_shared_storage_resumes_on_another_machine(prepared, uninterrupted, tmp_path):
    """Machine A is stopped mid-run (a reclaimed spot instance); machine B, another copy of the project with the
    same params and data, finds the state under train.state_dir (a mounted bucket, NFS) and finishes the run."""
    shared = tmp_path / "bucket" / "cars-run"
    machines = [copy_of(prepared, tmp_path / name, **{"train.state_dir": str(shared)})
                for name in ("machine_a", "machine_b")]
    code, _ = interrupt_after_first_epoch(machines[0], signal.SIGKILL, state_dir=shared)
    assert code == -signal.SIGKILL and not states(machines[0] / STATE_DIR)
    (state,) = states(shared)
    shutil.rmtree(machines[0])  # the machine is gone
    out = run_ok("train", machines[1])
    assert f"resuming after epoch 1/{EPOCHS} from {state}" in out
    expected, got = weights(uninterrupted), weights(machines[1])
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not states(shared)  # a finished run's state is deleted


@pytest.mark.parametrize("sig,whole_group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["sigterm", "ctrl-c"])
def test_interrupt_stops_cleanly_with_one_line(workdir, sig, whole_group):
    code, out = interrupt_after_first_epoch(workdir, sig, whole_group)
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("train: interrupted in epoch") and "run `dvc repro` again to resume" in last
    assert "Traceback" not in out
    assert states(workdir / STATE_DIR)


def test_a_run_of_other_params_in_the_same_state_dir_leaves_an_unfinished_run_to_resume(killed_copy, uninterrupted):
    """Before: the later run, finishing, deleted the interrupted run's state (one file for all), and the
    interrupted run started again at epoch 1."""
    workdir = killed_copy
    (interrupted,) = states(workdir / STATE_DIR)
    with_params(workdir, **{"train.lr": 0.02})
    out = run_ok("train", workdir)
    assert "resuming" not in out and len(curve(workdir, "train/loss.tsv")) == EPOCHS
    assert f"also holds the state of 1 unfinished run(s) of other params or data ({interrupted.name})" in out
    assert states(workdir / STATE_DIR) == [interrupted]  # the other run deleted only its own state
    with_params(workdir, **{"train.lr": 0.05})
    assert f"resuming after epoch 1/{EPOCHS} from {STATE_DIR / interrupted.name}" in run_ok("train", workdir)
    expected, got = weights(uninterrupted), weights(workdir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not states(workdir / STATE_DIR)


def test_a_run_stopped_after_its_last_epoch_writes_the_model_without_training_again(workdir, uninterrupted,
                                                                                      monkeypatch):
    """Before: killed after the last epoch's state was saved and before models/model.pt was written, the next run
    said "it is a finished run; starting fresh" and trained every epoch again. And SIGTERM no longer raises in
    the model save (the handler is gone once the epochs are done): it ends the process, the state stays."""
    from finetune import trainer, training

    monkeypatch.chdir(workdir)
    handlers = []

    def killed_while_saving(*args):
        handlers.append(signal.getsignal(signal.SIGTERM))
        raise SystemExit("killed while writing the model")

    monkeypatch.setattr(training, "save_model", killed_while_saving)
    with pytest.raises(SystemExit):
        training.run(load_params())
    assert handlers == [signal.SIG_DFL] and len(states(workdir / STATE_DIR)) == 1
    monkeypatch.undo()
    monkeypatch.chdir(workdir)

    def must_not_train(self, loader, epoch):
        raise AssertionError(f"epoch {epoch + 1} trained again")

    monkeypatch.setattr(trainer.Trainer, "train_epoch", must_not_train)
    training.run(load_params())
    expected, got = weights(uninterrupted), weights(workdir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert curve(workdir, "train/loss.tsv") == curve(uninterrupted, "train/loss.tsv")
    assert not states(workdir / STATE_DIR)


def test_a_state_damaged_on_disk_is_not_resumed(killed_copy, uninterrupted):
    """Before: 64 corrupted bytes in a tensor of the state loaded (torch checks no CRC), resumed, and the NaN that
    followed was blamed on the learning rate."""
    workdir = killed_copy
    state = the_state(workdir)
    data = bytearray(state.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    state.write_bytes(bytes(data))
    out = run_ok("train", workdir)
    assert f"ignoring {STATE_DIR / state.name}: its checksum does not match its contents" in out
    assert "resuming" not in out
    expected, got = weights(uninterrupted), weights(workdir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_worker_count_does_not_change_the_result(workdir, uninterrupted):
    with_params(workdir, **{"train.num_workers": 0})
    run_ok("train", workdir)
    expected, got = weights(uninterrupted), weights(workdir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_diverging_loss_stops_with_the_likely_cause(workdir, monkeypatch):
    """A loss that turns NaN (here from the second epoch on; lr beyond the schema's 10 is refused up front) stops
    the run with the cause, keeping the last good epoch for a resume."""
    from finetune import trainer, training

    real_epoch = trainer.Trainer.train_epoch

    def diverging(self, loader, epoch):
        if epoch == 1:
            raise trainer.LossNotFinite(float("nan"))
        return real_epoch(self, loader, epoch)

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(trainer.Trainer, "train_epoch", diverging)
    with pytest.raises(StageError) as stopped:
        training.run(load_params())
    message = str(stopped.value)
    assert "the training loss became nan in epoch 2" in message and "learning rate is likely too high" in message
    assert "train.lr=0.05" in message and "The last good epoch (1) is kept" in message
    assert not (workdir / "models/model.pt").exists() and states(workdir / STATE_DIR)


def test_crash_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text(json.dumps({"top1": 0.5}))
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"top1": 0.')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"top1": 0.5}
    assert list(tmp_path.iterdir()) == [target]


def test_dvc_repro_resumes_after_the_whole_run_is_killed(tmp_path, image_folder):
    # Up to train, at 32 px (PREPARED_PARAMS): the stages after it read a finished model and resume nothing.
    project = make_project(tmp_path, tiny_params(image_folder, **{"train.epochs": EPOCHS, "train.resolution": 32}))
    repro = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=project_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not states(project / STATE_DIR):
        assert repro.poll() is None and time.monotonic() < deadline, "dvc repro ended before train's first epoch"
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)  # a lost machine: no handler runs
    repro.wait()
    log = run(["dvc", "repro", "train"], project).stdout
    assert "Running stage 'fetch'" not in log and "Running stage 'prepare'" not in log
    assert "train: resuming after epoch" in log
    assert [step for step, _ in curve(project, "train/loss.tsv")] == [str(s) for s in range(1, EPOCHS + 1)]
    assert run(["dvc", "status", "--json", "train"], project).stdout.strip() == "{}"  # train and all before it


def test_cuda_out_of_memory_names_the_batch_size_and_the_fix(workdir, monkeypatch):
    from finetune import training

    def out_of_memory(self, loader, epoch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(training.Trainer, "train_epoch", out_of_memory)
    with pytest.raises(StageError) as stopped:
        training.run(load_params())
    message = str(stopped.value)
    assert "CUDA out of memory at train.batch_size=32, train.resolution=32" in message
    assert "Lower train.batch_size" in message and "scale train.lr" in message


def test_state_from_other_data_is_not_resumed(killed_copy):
    workdir = killed_copy
    (interrupted,) = states(workdir / STATE_DIR)
    with_params(workdir, **{"prepare.jpeg_quality": 70})  # other prepared images, same training params
    run_ok("prepare", workdir)
    out = run_ok("train", workdir)
    assert "resuming" not in out and f"unfinished run(s) of other params or data ({interrupted.name})" in out


def test_crash_while_saving_a_dataset_leaves_the_old_one(tmp_path):
    from finetune.files import atomic_dir

    old = tmp_path / "prepared"
    old.mkdir()
    (old / "data-00000-of-00001.arrow").write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_dir(old) as tmp:
            tmp.mkdir()
            (tmp / "data-00000-of-00001.arrow").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (old / "data-00000-of-00001.arrow").read_text() == "complete"
    assert list(tmp_path.iterdir()) == [old]
    with atomic_dir(old) as tmp:
        tmp.mkdir()
        (tmp / "new.arrow").write_text("new")
    assert [p.name for p in old.iterdir()] == ["new.arrow"] and list(tmp_path.iterdir()) == [old]


PLANTED_STATE = """
import os, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"format": "transfer-learning-train-state/2", "fingerprint": Payload()}}, "{path}")
"""

PLANTED_INSIDE = """
import hashlib, io, os, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
inner = io.BytesIO()
torch.save({{"format": "transfer-learning-train-state/4", "fingerprint": Payload()}}, inner)
payload = inner.getvalue()  # a well-formed outer file with a matching checksum around a hostile state
torch.save({{"format": "transfer-learning-train-state/4", "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}}, "{path}")
"""


@pytest.mark.parametrize("kind", ["planted", "planted inside", "truncated", "foreign", "not torch"])
def test_a_hostile_or_broken_state_file_runs_nothing_and_is_ignored(killed_copy, uninterrupted, kind):
    """Before: a planted checkpoints/train_state.pt ran its own code when train started (weights_only=False), and
    a truncated or foreign one crashed train with a KeyError."""
    workdir = killed_copy  # a real run's state file, at the name this run looks for; replaced below
    state, marker = the_state(workdir), workdir / "code_ran"
    if kind == "planted":
        subprocess.run([sys.executable, "-c", PLANTED_STATE.format(marker=marker, path=state)], check=True)
    elif kind == "planted inside":
        subprocess.run([sys.executable, "-c", PLANTED_INSIDE.format(marker=marker, path=state)], check=True)
    elif kind == "truncated":
        state.write_bytes(state.read_bytes()[:20000])
    elif kind == "foreign":
        torch.save({"epoch": 3, "model": {}}, state)
    else:
        state.write_text("not a checkpoint")
    out = run_ok("train", workdir)
    assert not marker.exists()
    ignored = [line for line in out.splitlines() if line.startswith(f"train: ignoring {STATE_DIR / state.name}")]
    assert len(ignored) == 1 and ignored[0].endswith("starting fresh"), out
    assert "weights_only=False" not in out  # torch's advice to run the file's code is not relayed
    expected, got = weights(uninterrupted), weights(workdir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # a fresh run, as if no file had been there


@pytest.mark.parametrize("progress,why", [
    ({"epochs_done": -3}, "epochs_done -3 is not a count of epochs"),
    ({"epochs_done": 2, "best_epoch": "x", "history": [{}, {}]}, "best_epoch 'x' is not one of its 2 epochs"),
    ({"epochs_done": 1, "history": "not a list"}, "its history is not one metrics record per finished epoch"),
    ({"epochs_done": 1, "history": [{}], "best_state": [1, 2]}, "its best weights are not a state dict"),
])
def test_a_state_with_a_valid_checksum_but_an_impossible_progress_record_is_ignored(tmp_path, capsys, progress, why):
    """Hostile round 3, R4-R6: `epochs_done = -3` ran 6 epochs of a 3-epoch run, `best_epoch = "x"` was written into
    the model checkpoint, `history = "not a list"` ended in an AttributeError traceback."""
    from finetune.files import save_torch
    from finetune.resume import FORMAT, pack, read_state

    fingerprint = {"model": {}, "train": {}, "data": {}}
    path = tmp_path / "train_state-x.pt"
    save_torch(path, pack({"format": FORMAT, "fingerprint": fingerprint, "progress": progress}))
    assert read_state(path, fingerprint, epochs=3) is None
    said = capsys.readouterr().out
    assert said == f"train: ignoring {path}: its progress record is damaged ({why}); starting fresh\n"
    sound = {"epochs_done": 1, "history": [{"train/loss": 1.0}], "best_accuracy": -1.0, "best_epoch": 0}
    save_torch(path, pack({"format": FORMAT, "fingerprint": fingerprint, "progress": sound}))
    assert read_state(path, fingerprint, epochs=3)["progress"] == sound


def test_the_stop_message_never_names_an_epoch_past_the_last():
    """Hostile round 3 leftover: a SIGTERM after a 3-epoch run's last saved epoch said "interrupted in epoch 4"."""
    from finetune.training import stopped_message

    state = Path("checkpoints/train_state-x.pt")
    assert stopped_message(3, 3, state) == ("train: interrupted after its last epoch, before the model was written; "
                                            f"all 3 epoch(s) are saved in {state}: run `dvc repro` again to resume")
    assert stopped_message(1, 3, state).startswith("train: interrupted in epoch 2 of 3; 1 finished epoch(s) are saved")


@pytest.mark.parametrize("ending,said", [
    (SystemExit("train: interrupted in epoch 2 of 4"), "train: interrupted in epoch 2 of 4"),  # train's stop
    (StageError("the training loss became nan"), "error: the training loss became nan"),
], ids=["stopped", "error"])
def test_a_stage_ending_early_clears_the_progress_bar_it_was_drawing(capsys, ending, said):
    """CI once read `epoch 2/4:   0%| ... [00:00<?, ?batch/s]train: interrupted in epoch 2 of 4...` as one line: a
    signal caught after the epoch's bar was drawn but before its loop started left it open (a loop closes its bar
    on the way out; one not started does not), and the stop message followed on its line."""
    from tqdm import tqdm

    from finetune.errors import run_stage

    bars = []  # as the stopped run's traceback does, which keeps the epoch's frame until the process exits

    def stopped_while_drawing():
        bars.append(tqdm(total=6, desc="epoch 2/4", unit="batch", leave=False))  # its loop never started
        raise ending

    with pytest.raises(SystemExit) as stopped:
        run_stage(stopped_while_drawing)
    drawn = capsys.readouterr().err
    assert str(stopped.value) == said
    assert "epoch 2/4" in drawn and drawn.endswith("\r")  # cleared: the message that follows starts its own line
