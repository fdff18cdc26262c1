"""The check stage refuses what would fail in train only after DVC deleted the previous results."""

from __future__ import annotations

import os

import pytest
import torch

from finetune.errors import StageError
from finetune.model import build_model
from finetune.params import parse_params
from finetune.preflight import check_recipe
from tests.conftest import shipped_params


def params_with(**changes):
    raw = shipped_params()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return parse_params(raw)


def test_the_shipped_recipe_passes_without_reading_weights_or_data():
    check_recipe(params_with(**{"model.weights": "none"}))
    check_recipe(params_with(**{"gradcam.target_layer": "layer3[-1]"}))  # a spatial block: accepted
    check_recipe(params_with())  # IMAGENET1K_V2: a name, not a download: the meta device builds no weights


@pytest.mark.parametrize("changes,message", [
    ({"train.unfreeze_from": "Mixed_7a"}, "train.unfreeze_from: ResNet has no module 'Mixed_7a'"),
    ({"model.arch": "inception_v3", "model.weights": "none", "train.resolution": 64},
     "inception_v3 cannot take train.resolution=64"),
    ({"model.arch": "vit_b_16", "model.weights": "none", "train.resolution": 256},
     "vit_b_16 cannot take train.resolution=256"),
    # Hostile round 3, Q3/Q4: these passed check, then the gradcam stage crashed after train and evaluate had run
    ({"gradcam.target_layer": "fc"}, r"'fc' is not a module with a spatial output \(its output at 224 px: \(1, 2\)\)"
                                     r".*Modules that have one, last first: layer4, layer4.2"),
    ({"gradcam.target_layer": "__class__"}, "'__class__' is not a module of ResNet"),
    ({"gradcam.target_layer": "layer4.0.conv1.weight"}, "'layer4.0.conv1.weight' is a Parameter of ResNet, not a "
                                                        "module"),
])
def test_model_dependent_mistakes_are_refused(changes, message):
    with pytest.raises(StageError, match=message):
        check_recipe(params_with(**changes))


def test_a_truncated_or_foreign_weights_file_is_refused_up_front(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(build_model("resnet50", 1000, "none").state_dict(), good)
    check_recipe(params_with(**{"model.weights": str(good)}))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100_000])
    with pytest.raises(StageError, match=f"{truncated} is not a readable PyTorch weights file"):
        check_recipe(params_with(**{"model.weights": str(truncated)}))
    other = tmp_path / "other.pt"
    torch.save(build_model("resnet18", 1000, "none").state_dict(), other)
    with pytest.raises(StageError, match="does not fit resnet50") as refused:
        check_recipe(params_with(**{"model.weights": str(other)}))
    # round 3: the message ended at "Error(s) in loading state_dict for ResNet:"; now it names the model the file fits
    assert str(refused.value).endswith("It fits resnet18: set model.arch to that")


def test_an_unwritable_state_dir_is_refused(tmp_path):
    from finetune.preflight import check_machine

    locked = tmp_path / "mnt"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        check_machine(params_with(**{"train.state_dir": str(tmp_path / "bucket" / "run")}))  # train creates it
        assert not (tmp_path / "bucket").exists()  # the check leaves no folder behind
        if not os.access(locked, os.W_OK):  # root writes anywhere: nothing to refuse
            with pytest.raises(StageError, match="train.state_dir .*mnt/run cannot be written"):
                check_machine(params_with(**{"train.state_dir": str(locked / "run")}))
        (tmp_path / "file").write_text("")
        with pytest.raises(StageError, match="file/run cannot be written .*Not a directory"):
            check_machine(params_with(**{"train.state_dir": str(tmp_path / "file" / "run")}))
    finally:
        locked.chmod(0o700)


def test_a_folder_at_a_state_file_name_is_refused_before_any_work(tmp_path):
    """Hostile round 3, R11: a folder at this run's state-file name passed check; train then raised
    IsADirectoryError after its first epoch, and again on every rerun."""
    from finetune.preflight import check_machine
    from finetune.resume import STATE_PREFIX, refuse_unusable_state_dir

    state_dir = tmp_path / "checkpoints"
    state_dir.mkdir()
    (state_dir / f"{STATE_PREFIX}0123abcd.pt").write_bytes(b"an ordinary state file")
    check_machine(params_with(**{"train.state_dir": str(state_dir)}))  # files are train's to judge
    (state_dir / f"{STATE_PREFIX}feedbeef.pt").mkdir()
    with pytest.raises(StageError, match=f"{STATE_PREFIX}feedbeef.pt is a folder, at the name where train saves a "
                                         "run's resume state: move it away, or set train.state_dir"):
        check_machine(params_with(**{"train.state_dir": str(state_dir)}))
    with pytest.raises(StageError, match="is a folder"):
        refuse_unusable_state_dir(state_dir)  # what train calls before its first epoch, with or without check
    (tmp_path / "file").write_text("")
    with pytest.raises(StageError, match="file/run cannot be written .*Not a directory"):
        refuse_unusable_state_dir(tmp_path / "file" / "run")  # round 3: train run directly gave a traceback


@pytest.mark.skipif(not os.access("/sys", os.W_OK) or os.path.exists("/sys/x"), reason="needs root: os.access "
                    "says /sys is writable only to root")
def test_a_state_dir_that_os_access_calls_writable_but_is_not_is_refused():
    """Before: as root, os.access said /sys/x could be written, check passed, and train died after epoch 1 (a
    FUSE bucket mount can do the same)."""
    from finetune.preflight import check_machine

    with pytest.raises(StageError, match="train.state_dir /sys/x/run cannot be written"):
        check_machine(params_with(**{"train.state_dir": "/sys/x/run"}))


def test_a_proxy_that_never_answers_gives_the_offline_message_not_a_hang(monkeypatch, tmp_path):
    """Hostile round 3, W2: model.weights: IMAGENET1K_V1 through an https_proxy that accepts connections and never
    answers (a stalled proxy, a captive portal) hung check forever: torch.hub's download has no timeout."""
    import socket
    import threading
    import time

    from finetune import model
    from finetune.preflight import check_weights

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    monkeypatch.setattr(model, "DOWNLOAD_STALL_SECONDS", 1)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    start = time.monotonic()
    try:
        with pytest.raises(StageError, match="could not download torchvision weights resnet18/IMAGENET1K_V1 .*timed "
                                             "out.* or set model.weights: none"):
            check_weights(params_with(**{"model.arch": "resnet18", "model.weights": "IMAGENET1K_V1"}))
    finally:
        server.close()
    assert time.monotonic() - start < 30 and accepted  # it reached the proxy, then gave up
    assert socket.getdefaulttimeout() is None  # the process's other sockets are left as they were


def test_named_weights_are_fetched_by_check_or_refused_with_the_fix(monkeypatch, tmp_path, capsys):
    """Before: `model.weights=IMAGENET1K_V1` offline failed at train, after check, fetch and prepare had run."""
    from finetune.preflight import check_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = params_with(**{"model.arch": "resnet18", "model.weights": "IMAGENET1K_V1"})
    with pytest.raises(StageError, match="could not download torchvision weights resnet18/IMAGENET1K_V1"):
        check_weights(params)
    # In the cache (as a run where the network is reachable leaves it): found, nothing downloaded.
    from torchvision.models import ResNet18_Weights

    cached = tmp_path / "torch" / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model("resnet18", 1000, "none").state_dict(), cached)
    check_weights(params)
    assert "check: resnet18 weights IMAGENET1K_V1 are in the local cache" in capsys.readouterr().out
    check_weights(params_with(**{"model.arch": "resnet18", "model.weights": "none"}))  # nothing to fetch


@pytest.mark.parametrize("content", [b"PK\x03\x04 a zip cut short", b"<html><body>Please log in</body></html>",
                                     os.urandom(4096)])
def test_a_damaged_cached_weights_file_is_named_with_the_fix(monkeypatch, tmp_path, content):
    """Hostile round 3, W3-W5: a truncated .pth, an HTML login page saved as the .pth, or random bytes in the
    torch cache ended in a traceback that did not name the cached file."""
    from torchvision.models import ResNet18_Weights

    from finetune.preflight import check_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(content)
    with pytest.raises(StageError, match=f"the cached weights file {cached} is damaged .*: delete it, and run again"):
        check_weights(params_with(**{"model.arch": "resnet18", "model.weights": "IMAGENET1K_V1"}))


def test_a_damaged_cached_timm_weights_file_is_named_with_the_fix(monkeypatch, tmp_path):
    """W5: random bytes as model.safetensors in the Hugging Face cache."""
    import timm

    from finetune.preflight import check_weights

    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_id = timm.models.get_pretrained_cfg("resnet18.a1_in1k").hf_hub_id
    repo = hub / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    weights = repo / "snapshots" / ("0" * 40) / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(os.urandom(4096))
    with pytest.raises(StageError, match=f"the cached weights file {weights} is damaged"):
        check_weights(params_with(**{"model.arch": "timm/resnet18.a1_in1k", "model.weights": "pretrained"}))


def test_a_whole_pickled_model_is_named_as_such_not_relayed_as_torch_advice(tmp_path):
    """Hostile round 3, W9: a file written by torch.save(model) was refused with torch's own advice to
    allow-list the class (add_safe_globals), which a user should not follow for a foreign file."""
    whole = tmp_path / "whole.pt"
    torch.save(build_model("resnet18", 1000, "none"), whole)
    with pytest.raises(StageError, match=r"holds a whole pickled model \(torchvision.models.resnet.ResNet.*"
                                         r"torch.save\(model.state_dict\(\), path\)") as refused:
        check_recipe(params_with(**{"model.arch": "resnet18", "model.weights": str(whole)}))
    assert "add_safe_globals" not in str(refused.value)
