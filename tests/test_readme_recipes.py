"""Every `dvc exp run` command in the README, as written: its params through DVC's own override parser (grid
sweeps expanded as DVC expands them) and our schema, its model built at full size, and each one run for real
on generated data with the run shrunk to CPU size."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
import yaml
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

from finetune.params import load_params
from finetune.trainer import Trainer
from tests.conftest import REPO, make_project, run, shipped_text, tiny_params
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.slow  # real stages, DVC runs or several processes

# What the CPU-size run changes; everything else stays as the README wrote it.
SHRUNK = {"train.epochs", "train.batch_size", "train.resolution", "train.freeze_epochs", "model.weights",
          "data.source", "train.warmup_epochs"}


DOCUMENTS = ("README.md", "docs/recipes.md", "docs/operations.md")


def readme_commands(section: str | None = None) -> list[str]:
    """The distinct `dvc exp run` commands of the README and docs, or of the document titled `section`, in order."""
    texts = {name: (REPO / name).read_text() for name in DOCUMENTS}
    text = "\n".join(texts.values()) if section is None else next(
        body for body in texts.values() if body.startswith(f"# {section}\n"))
    inline = re.findall(r"`(dvc exp run [^`]+)`", text)
    in_blocks = [line.split(" # ")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                 for line in block.replace("\\\n", " ").splitlines() if line.startswith("dvc exp run ")]
    # Ties (a command that is a prefix of another, or one joined from several lines) broken by the text itself:
    # pytest-xdist's workers must collect the same order, and a set's order changes with each process's hash seed.
    return sorted(set(inline + [" ".join(command.split()) for command in in_blocks]), key=lambda c: (
        text.index(c) if c in text else len(text), c))


def overrides_of(command: str) -> list[str]:
    words = shlex.split(command)
    return [words[i + 1] for i, word in enumerate(words) if word in ("-S", "--set-param")]


def expanded(command: str) -> list[list[str]]:
    """One override list per experiment the command makes (a grid `a=1,2` makes two), as DVC expands it."""
    return [sweep["params.yaml"] for sweep in get_hydra_sweeps({"params.yaml": overrides_of(command)})]


def params_after(overrides: list[str], tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(shipped_text("params.yaml"))
    apply_overrides(str(path), overrides)
    return load_params(path)


def test_the_readme_has_every_seed_experiment():
    commands = readme_commands("Recipes")
    # 7 Stanford Cars runs beside the default, the strong ResNet-50 recipe, 2 timm recipes, 6 Caltech, flowers
    assert len(commands) >= 17 and sum("model.arch=timm/" in c for c in commands) == 2
    caltech_sweeps = [c for c in commands if "--queue" in c and "caltech101" in c]
    assert len(caltech_sweeps) == 3 and all(len(expanded(c)) == 3 for c in caltech_sweeps)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_gives_valid_params_and_a_buildable_model(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for overrides in expanded(command):
        params = params_after(overrides, tmp_path)
        # The full-size model (random init: the weights download is unreachable here), heads, freezing plan,
        # optimizer groups and input size check, exactly as train builds them.
        raw = params.model_dump()
        raw["model"]["weights"] = "none"
        raw["train"]["head_init"] = "random"  # a probe needs pretrained weights (tests/test_pipeline.py runs one)
        trainer = Trainer(type(params).model_validate(raw), 196, torch.device("cpu"))
        assert trainer.learning_rates()["lr"] == pytest.approx(params.train.lr * (
            1 if params.train.warmup_epochs == 0 else 1 / (params.train.warmup_epochs + 1)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One generated folder per split layout the presets expect."""
    root = tmp_path_factory.mktemp("sources")
    layouts = {"stanford_cars": {"train": 12, "test": 4}, "caltech101": {"train": 20},
               "flowers102": {"train": 8, "validation": 4, "test": 4}}
    for preset, per_class in layouts.items():
        make_image_folder(root / preset, num_classes=3, per_class=per_class)
    return root


def shrunk(command: str, sources) -> list[str]:
    """The command's first experiment, with the SHRUNK params set for a 2-core CPU."""
    first = expanded(command)[0]
    overrides = [o for o in first if o.split("=")[0] not in SHRUNK]
    values = dict(o.split("=", 1) for o in first)
    preset = values.get("data.preset", "stanford_cars")
    arch = values.get("model.arch", "")
    inception = arch == "inception_v3"
    if arch.startswith("timm/"):  # timm's tiny test model of the same family: the same code paths, a 1000th of it
        overrides = [o for o in overrides if not o.startswith("model.arch=")]
        overrides.append("model.arch=timm/test_convnext" if "convnext" in arch else "model.arch=timm/test_vit")
    return overrides + [
        f"data.source={sources / preset}", "model.weights=none", "train.epochs=2", "train.batch_size=8",
        f"train.resolution={80 if inception else 32}",
        f"train.freeze_epochs={min(1, int(values.get('train.freeze_epochs', 0)))}",
        f"train.warmup_epochs={min(1, int(values.get('train.warmup_epochs', 0)))}",
    ]


def one_per_recipe_shape(commands: list[str]) -> list[str]:
    """The first command for each set of params set: the others differ only in values, which
    test_readme_command_gives_valid_params_and_a_buildable_model checks for every command and grid point."""
    chosen, seen = [], set()
    for command in commands:
        keys = frozenset(o.split("=")[0] for o in overrides_of(command))
        if keys not in seen:
            seen.add(keys)
            chosen.append(command)
    return chosen


def test_readme_recipes_run_as_written(tmp_path, sources):
    params = tiny_params(sources / "stanford_cars", **{"train.num_workers": 0, "gradcam.num_samples": 2,
                                                        "gradcam.num_misclassified": 1})
    project = make_project(tmp_path, params)
    # Up to train (evaluate for TTA): the recipes change what is trained; evaluate, gradcam, report and export are
    # tested elsewhere (test_pipeline) and would add ~25 s to each of these runs.
    run(["dvc", "repro", "evaluate"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    committed = yaml.safe_load((project / "params.yaml").read_text())
    for command in one_per_recipe_shape(readme_commands("Recipes")):
        run(["git", "checkout", "params.yaml"], project)  # each command starts from the committed params (README)
        overrides = shrunk(command, sources)
        # Up to train, or evaluate where the recipe sets evaluate.* (TTA): evaluate alone adds ~6 s to a run.
        last = "evaluate" if any(o.startswith("evaluate.") for o in overrides) else "train"
        result = run(["dvc", "exp", "run", last, *[word for o in overrides for word in ("-S", o)]], project)
        log = result.stdout + result.stderr
        # Shrunk to CPU size, the lr-only sweep of the Experiments section equals an earlier run: DVC reuses it.
        assert "Running stage 'train'" in log or "Stage 'train' didn't change" in log, command
        expected = tmp_path / "expected.yaml"
        expected.write_text(yaml.safe_dump(committed, sort_keys=False))
        apply_overrides(str(expected), overrides)
        assert yaml.safe_load((project / "params.yaml").read_text()) == yaml.safe_load(expected.read_text())
        if last == "evaluate":
            assert 0 <= json.loads((project / "metrics/eval.json").read_text())["top1"] <= 1, command
        trained = json.loads((project / "metrics/train/metrics.json").read_text())
        assert trained["step"] == 2 and trained["train"]["loss"] > 0, command  # both (shrunk) epochs ran
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    assert "inception_v3" in json.dumps(shown) and "caltech101" in json.dumps(shown)
