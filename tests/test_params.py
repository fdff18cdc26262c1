"""params.yaml is checked against one schema before any work; every message names the param and the fix."""

from __future__ import annotations

import copy

import pytest
import yaml

from finetune.params import ParamsError, load_params, parse_params
from tests.conftest import REPO, shipped_params, shipped_text


@pytest.fixture(scope="module")
def defaults() -> dict:
    return shipped_params()


def problems(raw: dict) -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    return str(caught.value)


def with_change(defaults: dict, section: str, key: str, value) -> dict:
    raw = copy.deepcopy(defaults)
    raw[section][key] = value
    return raw


def test_shipped_params_are_the_seeds_recipe(tmp_path):
    (tmp_path / "params.yaml").write_text(shipped_text("params.yaml"))
    params = load_params(tmp_path / "params.yaml")
    assert params.data.source == "tanganke/stanford_cars" and params.data.val_fraction == 0
    assert (params.model.arch, params.model.weights) == ("resnet50", "IMAGENET1K_V2")
    t = params.train
    assert (t.resolution, t.batch_size, t.epochs, t.lr, t.momentum, t.weight_decay) == (224, 128, 90, 0.1, 0.9, 1e-4)
    assert (t.lr_step_epochs, t.lr_gamma) == (30, 0.1)


def test_unknown_key_suggests_the_right_one(defaults):
    message = problems(with_change(defaults, "train", "learning_rate", 0.1))
    assert "train.learning_rate: unknown key (did you mean train.lr?)" in message


def test_unknown_section_is_reported(defaults):
    raw = copy.deepcopy(defaults)
    raw["trian"] = {}
    assert "trian: unknown key (did you mean train?)" in problems(raw)


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "resolution", 16, "train.resolution: Input should be greater than or equal to 32 (got 16)"),
    ("train", "batch_size", 0, "train.batch_size: Input should be greater than or equal to 1"),
    ("train", "lr", 0, "train.lr: Input should be greater than 0"),
    ("train", "lr", -0.1, "train.lr: Input should be greater than 0"),
    ("train", "epochs", 0, "train.epochs: Input should be greater than or equal to 1"),
    ("train", "batch_size", "64", "train.batch_size: Input should be a valid integer (got '64')"),
    ("train", "amp", "fp8", "train.amp: Input should be 'auto', 'bf16', 'fp16' or 'none'"),
    ("data", "val_fraction", 1.0, "data.val_fraction: Input should be less than 1"),
    ("evaluate", "tta", "yes", "evaluate.tta: Input should be a valid boolean"),
])
def test_impossible_values_name_param_and_limit(defaults, section, key, value, expected):
    assert expected in problems(with_change(defaults, section, key, value))


def test_unknown_arch_lists_close_names(defaults):
    message = problems(with_change(defaults, "model", "arch", "resnet5"))
    assert "model.arch: unknown torchvision classification model 'resnet5'. Did you mean resnet50" in message
    assert "convnext_tiny" in message  # the allowed list


def test_unknown_weights_name_lists_allowed(defaults):
    message = problems(with_change(defaults, "model", "weights", "IMAGENET1K_V3"))
    assert "model.weights 'IMAGENET1K_V3'" in message
    assert "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, none" in message and "path to a local state dict" in message


def test_weights_accepts_none_and_an_existing_file(defaults, tmp_path):
    parse_params(with_change(defaults, "model", "weights", "none"))
    state = tmp_path / "weights.pt"
    state.write_bytes(b"x")
    parse_params(with_change(defaults, "model", "weights", str(state)))


def test_every_problem_is_reported_at_once(defaults):
    raw = with_change(defaults, "train", "resolution", 8)
    raw["train"]["lr"] = 0
    assert "2 problem(s)" in problems(raw)


def test_missing_key_is_named(defaults):
    raw = copy.deepcopy(defaults)
    del raw["train"]["seed"]
    assert "train.seed: missing" in problems(raw)


def test_stages_that_build_no_model_skip_the_model_name_lookup(tmp_path, defaults):
    """fetch, prepare and report read params without importing torchvision (~3.5 s each); check looks the names
    up before them, and the stages that build the model look them up too."""
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change(defaults, "model", "arch", "resnet5")))
    probe = ("import sys; from finetune.params import load_params; p = load_params('params.yaml', "
             "look_up_models=False); print(p.model.arch, 'torchvision' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.stdout.split() == ["resnet5", "False"], result.stderr
    assert "unknown torchvision classification model 'resnet5'" in problems(with_change(defaults, "model", "arch",
                                                                                          "resnet5"))


def test_params_cli_exits_with_the_message(tmp_path, defaults):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change(defaults, "train", "learning_rate", 1)))
    result = subprocess.run([sys.executable, "-m", "finetune.params"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "did you mean train.lr?" in result.stderr and "Traceback" not in result.stderr


def test_the_params_doc_is_the_table_the_schema_generates(defaults):
    """One source: each meaning is its field's description (finetune/params.py), each default in params.yaml."""
    from finetune.params import Params, field_description, params_table

    text = shipped_text("docs/params.md")
    table = params_table(defaults)
    assert table in text, "docs/params.md is stale: paste the output of `python -m finetune.params --table`"
    fields = {f"{s}.{name}" for s, f in Params.model_fields.items() for name in f.annotation.model_fields}
    assert fields == {f"{s}.{k}" for s, keys in defaults.items() for k in keys}  # every param documented, none more
    for key in fields:
        assert f"`{key}`" in table and len(field_description(key)) > 10


def test_params_yaml_comments_are_the_descriptions_first_sentences():
    """params.yaml's comments are generated from the fields (`python -m finetune.params --comments`), never a
    second text that drifts from the first."""
    from finetune.params import commented_params_yaml

    shipped = shipped_text("params.yaml")
    assert commented_params_yaml(shipped) == shipped, "run `python -m finetune.params --comments`"
    assert "# the backbone's learning rate (every layer's, with head_lr_multiplier 1)" in shipped


def test_exponent_floats_written_by_dvc_load_as_numbers(tmp_path):
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(shipped_text("params.yaml"))
    apply_overrides(str(path), ["train.lr=1e-5", "train.weight_decay=5e-4"])
    assert "1e-05" in path.read_text()  # YAML 1.1 (PyYAML's safe_load) would read this as a string
    params = load_params(path)
    assert params.train.lr == 1e-5 and params.train.weight_decay == 5e-4


def test_an_unknown_export_format_names_the_choices(defaults):
    message = problems(with_change(defaults, "export", "format", "tflite"))
    assert "export.format" in message and "onnx" in message and "torchscript" in message


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "lr", float("inf"), "train.lr: Input should be a finite number"),
    ("train", "lr", float("nan"), "train.lr: Input should be a finite number"),
    ("train", "resolution", 100000, "train.resolution: Input should be less than or equal to 4096"),
    ("train", "seed", 2**70, "train.seed: Input should be less than or equal to 4294967295"),
    ("train", "seed", -1, "train.seed: Input should be greater than or equal to 0"),
    ("train", "num_workers", 10000, "train.num_workers: Input should be less than or equal to 256"),
    ("prepare", "num_workers", 10000, "prepare.num_workers: Input should be less than or equal to 256"),
    ("train", "epochs", -1, "train.epochs: Input should be greater than or equal to 1"),
    ("evaluate", "amp", "fp8", "evaluate.amp: Input should be 'auto', 'bf16', 'fp16' or 'none'"),
])
def test_absurd_values_are_refused_before_any_work(defaults, section, key, value, expected):
    assert expected in problems(with_change(defaults, section, key, value))


def test_yaml_values_inf_and_nan_are_read_and_refused(tmp_path, defaults):
    text = yaml.safe_dump(defaults).replace("lr: 0.1\n", "lr: .inf\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match="train.lr: Input should be a finite number"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("text,expected", [
    ("train:\n  lr: [0.1\n", "is not valid YAML at line 3"),
    ("train: {lr: 0.1\n", "is not valid YAML"),
    ("- just\n- a list\n", "holds a list, not sections of params"),
])
def test_broken_yaml_is_one_message_with_the_line(tmp_path, text, expected):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=expected) as caught:
        load_params(tmp_path / "params.yaml")
    assert "git checkout" in str(caught.value) or "sections" in str(caught.value)


def test_a_yaml_alias_bomb_is_refused_in_a_few_lines(tmp_path):
    """Before: a 6.4 KB YAML alias bomb as train.lr made `check` print 1.26 GB of error text (4.4 GB RSS, 42 s):
    the error formatted the expanded value."""
    import time

    from finetune.params import ParamsError, load_params

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = shipped_text("params.yaml").replace("  lr: 0.1 ", "  lr: *a8 ", 1)
    path = tmp_path / "params.yaml"
    path.write_text("bombs:\n" + "\n".join(f"  {line}" for line in levels) + "\n" + text)
    start = time.monotonic()
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    assert time.monotonic() - start < 10 and len(str(refused.value)) < 2000
    assert "train.lr: Input should be a valid number" in str(refused.value) and "bombs: unknown key" in str(
        refused.value)


@pytest.mark.parametrize("section,key,value,expected", [
    ("evaluate", "batch_size", "AUTO", "evaluate.batch_size: `auto` or a whole number from 1 to 65536 (got 'AUTO')"),
    ("train", "num_threads", 0, "train.num_threads: `auto` or a whole number from 1 to "),
    ("train", "compile", "yes", "train.compile: `auto` or `true` or `false` (got 'yes')"),
    ("probe", "regularization", "x", "probe.regularization: `auto` or a number above 0 and at most 1000000 (got 'x')"),
])
def test_a_union_param_is_refused_in_words_not_pydantic_branch_names(defaults, section, key, value, expected):
    """Hostile round 3, E2: `evaluate.batch_size: AUTO` was refused twice, as `evaluate.batch_size.constrained-int`
    and `evaluate.batch_size.literal['auto']`: pydantic's names of the union's branches."""
    text = problems(with_change(defaults, section, key, value))
    assert expected in text and "1 problem(s)" in text
    assert "constrained" not in text and "literal[" not in text


def test_a_weights_path_under_home_is_expanded(defaults, tmp_path, monkeypatch):
    """Hostile round 3, W11: `~` in model.weights was taken literally, though train.state_dir expands it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "lite0.pth").write_bytes(b"x")
    params = parse_params(with_change(defaults, "model", "weights", "~/lite0.pth"))
    assert params.model.weights == str(tmp_path / "lite0.pth")
