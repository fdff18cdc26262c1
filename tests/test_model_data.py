"""The one transform definition, the one model builder and the checkpoint format."""

from __future__ import annotations

import io
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finetune import model as model_module
from finetune.cam import channels_last_to_first, gradcam_target, vit_tokens_to_grid
from finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from finetune.data import resolve_workers
from finetune.errors import StageError
from finetune.images import ImageRejected, decode_prepared, jpeg_size
from finetune.model import WeightsUnavailable, build_model, constructor_kwargs, input_size_problem
from finetune.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    eval_transform,
    to_model_input,
    train_transform,
)

LINEAR_HEAD = {"head": "linear", "head_hidden": 1024, "head_dropout": 0.0}


def record(names: list[str], resolution: int = 64, **fields) -> Checkpoint:
    return Checkpoint(arch="resnet18", class_names=names, preprocessing=Preprocessing(resolution),
                      head=fields.pop("head", LINEAR_HEAD), **fields)


@pytest.mark.parametrize("resolution", [32, 64, 224])
def test_transforms_give_uint8_squares_of_the_resolution(resolution):
    image = Image.new("RGB", (97, 61), (10, 20, 30))
    for transform in (train_transform(resolution), eval_transform(Preprocessing(resolution))):
        tensor = transform(image)
        assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, resolution, resolution)


def test_eval_transform_is_deterministic_and_centred():
    image = Image.effect_noise((120, 90), 40).convert("RGB")
    assert torch.equal(eval_transform(Preprocessing(64))(image), eval_transform(Preprocessing(64))(image))


def test_a_photo_and_the_decoded_dataset_image_are_transformed_alike():
    """predict's PIL photos and the dataset's TorchCodec tensors meet the same tensor kernels."""
    photo = Image.effect_noise((120, 90), 40).convert("RGB")
    encoded = io.BytesIO()
    photo.save(encoded, format="JPEG", quality=95)
    from_pil = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
    from_torchcodec = decode_prepared(encoded.getvalue())
    assert torch.equal(eval_transform(Preprocessing(64))(from_pil), eval_transform(Preprocessing(64))(from_torchcodec))
    for seed in range(3):
        torch.manual_seed(seed)
        expected = train_transform(64, augment="trivial_augment")(from_pil)
        torch.manual_seed(seed)
        assert torch.equal(train_transform(64, augment="trivial_augment")(from_torchcodec), expected)


def jpeg_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def smooth_photo(width: int, height: int) -> Image.Image:
    """Broad shapes and gradients, as in a photo; noise alone would make any two resamplings disagree."""
    return Image.effect_mandelbrot((width, height), (-2.0, -1.2, 0.8, 1.2), 60).convert("RGB").resize(
        (width, height), Image.Resampling.BILINEAR)


@pytest.fixture
def decodes(monkeypatch):
    """The reductions the transforms asked finetune.images.decode_prepared for, in order."""
    from finetune import transforms

    asked = []

    def recording(encoded, reduction=1):
        asked.append(reduction)
        return decode_prepared(encoded, reduction)

    monkeypatch.setattr(transforms, "decode_prepared", recording)
    return asked


def test_a_crop_too_small_to_reduce_is_the_crop_of_the_whole_decode(decodes):
    """Bytes in: the box is drawn from the JPEG's header with the same random draws as from the decoded
    tensor, so when no DCT reduction applies the crop is the same, pixel for pixel."""
    encoded = jpeg_bytes(smooth_photo(120, 90))
    for seed in range(5):
        torch.manual_seed(seed)
        expected = train_transform(64, augment="trivial_augment")(decode_prepared(encoded))
        torch.manual_seed(seed)
        assert torch.equal(train_transform(64, augment="trivial_augment")(encoded), expected)
    assert decodes == [1] * 5


def test_a_large_crop_is_decoded_at_a_dct_reduction_and_differs_little(decodes):
    """A box of at least 2x the output on both sides is decoded at 1/2 (or less): the same box of the same
    photo, pixels within a few levels of the crop of the whole decode."""
    encoded = jpeg_bytes(smooth_photo(1024, 768))
    transform = train_transform(64, crop_scale=(0.5, 1.0), hflip=False)
    for seed in range(5):
        torch.manual_seed(seed)
        reduced = transform(encoded)
        torch.manual_seed(seed)
        whole = transform(decode_prepared(encoded))
        assert reduced.shape == whole.shape == (3, 64, 64)
        assert (reduced.float() - whole.float()).abs().mean() < 3
    assert len(decodes) == 5 and min(decodes) >= 2


def test_eval_decodes_a_large_image_reduced_and_a_photo_as_the_dataset_image(decodes):
    """1024x768 for a 256-px shorter side: decoded at 1/2 (768 / 4 would be under 256), as bytes (the dataset)
    or as a photo opened by predict; both within a few levels of the whole decode's crop."""
    photo = smooth_photo(1024, 768)
    encoded = jpeg_bytes(photo)
    transform = eval_transform(Preprocessing(224))
    from_bytes = transform(encoded)
    assert decodes == [2]
    from_photo = transform(Image.open(io.BytesIO(encoded)))
    assert torch.equal(from_photo, from_bytes)
    whole = transform(decode_prepared(encoded))
    assert (from_bytes.float() - whole.float()).abs().mean() < 3


def test_a_large_sideways_photo_is_decoded_reduced_then_turned_upright(tmp_path):
    """predict's photos: stored 1600x1200, decoded at 1/4 (1/8 would leave 150 px, under the 256-px resize), then
    turned by its EXIF orientation; the model sees the upright photo, within a few levels of the whole decode's."""
    upright = smooth_photo(1200, 1600)  # portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways (landscape), to be turned 90 degrees to view
    path = tmp_path / "sideways.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", quality=95, exif=exif)
    transform = eval_transform(Preprocessing(224))
    photo = Image.open(path)
    seen = transform(photo)
    assert sorted(photo.size) == [300, 400]  # decoded at 1/4 (and turned upright in place)
    expected = transform(torch.from_numpy(np.asarray(upright)).permute(2, 0, 1))
    assert (seen.float() - expected.float()).abs().mean() < 4


def test_a_jpeg_pillow_cannot_read_is_decoded_whole_and_still_cropped_right(monkeypatch):
    """prepare checks that TorchCodec reads what it keeps, not Pillow: should Pillow refuse one, the loader
    decodes it whole and crops the same box."""
    encoded = jpeg_bytes(smooth_photo(1024, 768))
    transform = train_transform(64, crop_scale=(0.5, 1.0), hflip=False)
    torch.manual_seed(0)
    expected = transform(decode_prepared(encoded))

    def refuse(self):
        raise OSError("broken data stream")

    monkeypatch.setattr(Image.Image, "load", refuse)
    assert tuple(decode_prepared(encoded, 2).shape) == (3, 768, 1024)
    torch.manual_seed(0)
    assert torch.equal(transform(encoded), expected)


@pytest.mark.parametrize("kind", ["baseline", "progressive", "grey", "cmyk", "exif", "restart markers"])
def test_jpeg_size_reads_what_pillow_reads(kind):
    photo = smooth_photo(131, 77)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    {"baseline": lambda: photo.save(out, format="JPEG"),
     "progressive": lambda: photo.save(out, format="JPEG", progressive=True),
     "grey": lambda: photo.convert("L").save(out, format="JPEG"),
     "cmyk": lambda: photo.convert("CMYK").save(out, format="JPEG"),
     "exif": lambda: photo.save(out, format="JPEG", exif=exif, comment=b"x" * 3000),
     "restart markers": lambda: photo.save(out, format="JPEG", restart_marker_blocks=4)}[kind]()
    assert jpeg_size(out.getvalue()) == Image.open(out).size == (131, 77)


def test_jpeg_size_skips_fill_bytes_before_a_marker():
    encoded = jpeg_bytes(smooth_photo(131, 77))
    padded = encoded[:2] + b"\xff\xff\xff" + encoded[2:]  # SOI, fill bytes, then the first marker
    assert jpeg_size(padded) == Image.open(io.BytesIO(padded)).size == (131, 77)


def test_jpeg_size_leaves_what_it_cannot_read_to_pillow():
    with pytest.raises(ImageRejected, match="not an image format"):
        jpeg_size(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    truncated = jpeg_bytes(smooth_photo(64, 48))[:40]  # cut before the start-of-frame segment
    with pytest.raises(ImageRejected):
        jpeg_size(truncated)


def test_normalization_happens_on_the_device_side():
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    inputs = to_model_input(batch, torch.device("cpu"), channels_last=True)
    assert inputs.dtype == torch.float32 and inputs.is_contiguous(memory_format=torch.channels_last)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(inputs[0, :, 0, 0], expected)


def test_worker_count_follows_the_cpus():
    assert resolve_workers(3) == 3 and resolve_workers(0) == 0
    assert 1 <= resolve_workers(-1) <= 16


@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                       ("efficientnet_b0", "classifier.1"), ("vit_b_32", "heads.head")])
def test_head_is_replaced_for_each_family(arch, head):
    model = build_model(arch, 7, "none")
    linear = model.get_submodule(head)
    assert isinstance(linear, nn.Linear) and linear.out_features == 7 and model.head_paths == (head,)


def test_mlp_head_has_a_hidden_layer_relu_and_dropout():
    model = build_model("resnet18", 7, "none", head="mlp", head_hidden=32, head_dropout=0.6)
    kinds = [type(m) for m in model.fc]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.fc[0].out_features == 32 and model.fc[2].p == 0.6 and model.fc[3].out_features == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_auxiliary_heads_are_replaced_too():
    inception = build_model("inception_v3", 5, "none")
    assert inception.head_paths == ("fc", "AuxLogits.fc") and inception.AuxLogits.fc.out_features == 5
    googlenet = build_model("googlenet", 5, "none")
    assert googlenet.head_paths == ("fc", "aux1.fc2", "aux2.fc2")
    without_aux = build_model("inception_v3", 5, "none", aux_logits=False)
    assert without_aux.head_paths == ("fc",) and constructor_kwargs(without_aux)["aux_logits"] is False


def test_input_sizes_are_checked_without_computing():
    assert input_size_problem("resnet18", 32, training=True) is None
    assert input_size_problem("inception_v3", 64, training=False)  # below its 75-px minimum
    assert input_size_problem("inception_v3", 224, training=False) is None
    assert input_size_problem("inception_v3", 224, training=True)  # the auxiliary head needs 299
    assert input_size_problem("inception_v3", 299, training=True) is None
    assert "Expected 224" in input_size_problem("vit_b_16", 256, training=False)


def test_model_without_linear_head_is_refused():
    with pytest.raises(ValueError, match="no nn.Linear head"):
        build_model("squeezenet1_0", 3, "none")


def test_unreachable_weights_name_the_offline_options(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(model_module.torchvision.models, "get_model", offline)
    with pytest.raises(WeightsUnavailable) as caught:
        model_module.build_model("resnet50", 4, "IMAGENET1K_V2")
    message = str(caught.value)
    assert "resnet50/IMAGENET1K_V2" in message and "model.weights: none" in message
    assert "path of a local state dict" in message


def test_real_download_path_fails_offline_with_the_message():
    with pytest.raises(WeightsUnavailable, match="model.weights: none"):
        build_model("resnet18", 4, "IMAGENET1K_V1")


def test_local_imagenet_state_dict_is_loaded_then_head_replaced(tmp_path):
    source = build_model("resnet18", 1000, "none")
    compiled_keys = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}  # as torch.compile saves them
    torch.save(compiled_keys, tmp_path / "imagenet.pt")
    model = build_model("resnet18", 5, str(tmp_path / "imagenet.pt"))
    assert model.fc.out_features == 5
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_local_checkpoint_with_matching_head_keeps_it(tmp_path):
    trained = build_model("resnet18", 5, "none", head="mlp", head_hidden=16)
    save_checkpoint(tmp_path / "model.pt", trained, record(list("abcde"), head={**LINEAR_HEAD, "head": "mlp",
                                                                                "head_hidden": 16}))
    model = build_model("resnet18", 5, str(tmp_path / "model.pt"), head="mlp", head_hidden=16)
    assert torch.equal(model.fc[3].weight, trained.fc[3].weight)


def test_a_pipeline_model_of_another_class_count_starts_a_run_with_its_backbone(tmp_path):
    """Before: model.weights = a models/model.pt of this pipeline (documented as allowed) was refused by check
    unless it had the ImageNet head count or this run's (check builds with 2 classes; train alone accepted it)."""
    from finetune.preflight import CHECK_CLASSES

    trained = build_model("resnet18", 5, "none")
    save_checkpoint(tmp_path / "model.pt", trained, record(list("abcde")))
    for classes in (CHECK_CLASSES, 196):
        model = build_model("resnet18", classes, str(tmp_path / "model.pt"))
        assert model.fc.out_features == classes and torch.equal(model.conv1.weight, trained.conv1.weight)
    mlp = build_model("resnet18", 3, str(tmp_path / "model.pt"), head="mlp", head_hidden=16)  # another head kind
    assert torch.equal(mlp.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)


def test_local_state_dict_of_another_model_is_refused_by_name(tmp_path):
    torch.save(build_model("resnet34", 5, "none").state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsUnavailable, match="does not fit resnet18"):
        build_model("resnet18", 5, str(tmp_path / "other.pt"))


def test_checkpoint_round_trip_carries_names_and_weights(tmp_path):
    model = build_model("resnet18", 3, "none").eval()
    save_checkpoint(tmp_path / "m.pt", model, record(["a", "b", "c"], constructor=constructor_kwargs(model),
                                                     params={"train": {"lr": 0.1}}))
    loaded, checkpoint = load_checkpoint(tmp_path / "m.pt")
    assert checkpoint.class_names == ["a", "b", "c"] and checkpoint.preprocessing.resolution == 64
    assert checkpoint.params["train"]["lr"] == 0.1 and checkpoint.preprocessing.mean == IMAGENET_MEAN
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file


def test_gradcam_layer_is_chosen_per_family_or_by_path():
    resnet = build_model("resnet18", 3, "none")
    assert gradcam_target(resnet, "auto") == (resnet.layer4[-1], None)
    assert gradcam_target(resnet, "layer3[-1]")[0] is resnet.layer3[-1]
    assert gradcam_target(resnet, "layer3.0.conv1")[0] is resnet.layer3[0].conv1
    mobilenet = build_model("mobilenet_v3_small", 3, "none")
    assert gradcam_target(mobilenet, "auto")[0] is mobilenet.features[-1]
    inception = build_model("inception_v3", 3, "none", aux_logits=False)
    assert gradcam_target(inception, "auto")[0] is inception.Mixed_7c
    googlenet = build_model("googlenet", 3, "none")
    assert gradcam_target(googlenet, "auto")[0] is googlenet.inception5b
    vit = build_model("vit_b_32", 3, "none")
    layer, reshape = gradcam_target(vit, "auto")
    assert layer is vit.encoder.layers[-1].ln_1 and reshape is vit_tokens_to_grid


def test_transformer_activations_become_spatial_maps():
    tokens = torch.randn(2, 1 + 7 * 7, 768)  # ViT: class token + 7x7 patches
    assert vit_tokens_to_grid(tokens).shape == (2, 768, 7, 7)
    assert torch.equal(vit_tokens_to_grid(tokens)[:, :, 0, 1], tokens[:, 2, :])
    assert channels_last_to_first(torch.randn(2, 7, 7, 96)).shape == (2, 96, 7, 7)  # Swin


def test_workers_stay_quiet_only_about_a_vanished_main_process(monkeypatch, capsys):
    import signal
    import sys

    from finetune.data import leave_interrupts_to_the_main_process

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *info: seen.append(info[0]))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep this test process's handlers
    leave_interrupts_to_the_main_process(0)
    sys.excepthook(BrokenPipeError, BrokenPipeError(), None)
    sys.excepthook(ConnectionResetError, ConnectionResetError(), None)
    sys.excepthook(ValueError, ValueError("a real worker error"), None)
    assert seen == [ValueError]


LOADER_OUTLIVING_MAIN = """
import sys, torch
from finetune.data import make_loader
loader = make_loader(torch.utils.data.TensorDataset(torch.arange(64)), batch_size=8, workers=2)
assert sum(1 for _ in loader) == 8
if sys.argv[1] == "stop":
    from finetune.data import stop_workers
    stop_workers(loader)
    assert loader._iterator is None
    assert sum(1 for _ in loader) == 8  # a stopped loader starts fresh workers when iterated again
    stop_workers(loader, None)
KEPT = loader  # as a frame kept by a library would: the loader, its persistent workers alive, at exit
print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["stop", "left_to_exit"])
def test_persistent_workers_never_hold_the_process_at_exit(how, tmp_path):
    """Regression: workers ignored SIGTERM, so a loader alive at exit kept `train` waiting forever."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "script.py"
    script.write_text(LOADER_OUTLIVING_MAIN)
    result = subprocess.run([sys.executable, str(script), how], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done" and "Error" not in result.stderr


def test_inference_normalizes_with_the_checkpoints_own_mean_and_std(tmp_path):
    """A model trained with other statistics (e.g. a CLIP-style backbone) is fed what it was trained on."""
    model = build_model("resnet18", 3, "none").eval()
    special = Preprocessing(64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bicubic")
    save_checkpoint(tmp_path / "m.pt", model, Checkpoint("resnet18", ["a", "b", "c"], special, LINEAR_HEAD))
    _, checkpoint = load_checkpoint(tmp_path / "m.pt")
    assert checkpoint.preprocessing == special
    batch = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    inputs = to_model_input(batch, torch.device("cpu"), False, special.mean, special.std)
    assert torch.allclose(inputs, torch.full_like(inputs, 2.0))  # (1 - 0.5) / 0.25


PLANTED = """
import os, pickle, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"format": "x", "state_dict": Payload()}}, "{path}")
"""


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    """A pickle that runs code when loaded without weights_only, a truncated file, foreign ones (made once: each
    test checks that its loads left no marker, so a load that ran the code fails it and every test after it)."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    marker = tmp_path / "code_ran"
    planted = tmp_path / "planted.pt"
    import subprocess
    import sys

    # Written in another process (its Payload class exists only there); the file is live: loading it the unsafe
    # way runs its code.
    subprocess.run([sys.executable, "-c", PLANTED.format(marker=marker, path=planted)
                    + f"torch.load('{planted}', weights_only=False)\n"], check=True)
    assert marker.exists()
    marker.unlink()
    good = build_model("resnet18", 3, "none")
    save_checkpoint(tmp_path / "good.pt", good, record(["a", "b", "c"]))
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weights": "not tensors"}, tmp_path / "dict.pt")
    (tmp_path / "text.pt").write_text("hello")
    return tmp_path, marker


@pytest.mark.parametrize("name", ["planted.pt", "truncated.pt", "list.pt", "dict.pt", "text.pt"])
def test_hostile_model_files_get_one_message_and_run_nothing(hostile_files, name):
    folder, marker = hostile_files
    with pytest.raises(StageError) as caught:
        load_checkpoint(folder / name)
    assert str(folder / name) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(WeightsUnavailable) as caught:
        build_model("resnet18", 3, str(folder / name))
    assert str(folder / name) in str(caught.value)
    assert not marker.exists()


def test_missing_model_names_the_stage_to_run(tmp_path):
    with pytest.raises(StageError, match="run `dvc repro train` first"):
        load_checkpoint(tmp_path / "missing.pt")


def test_eval_transform_caps_the_longer_side_of_a_thin_image():
    """A 3000x100 strip would be resized to 7680x256 px by a plain shorter-side resize; images this thin are
    refused where they are read (finetune/images.py), and the cap bounds any that reach a transform anyway."""
    thin = Image.new("RGB", (3000, 100), (255, 0, 0))
    transform = eval_transform(Preprocessing(224))
    resize = transform.transforms[1]
    assert resize.max_size == 256 * 10
    assert tuple(resize(transform.transforms[0](thin)).shape) == (3, 85, 2560)
    assert tuple(transform(thin).shape) == (3, 224, 224)


def test_batched_predict_keeps_the_order_the_errors_and_the_answers(tmp_path):
    """Batches of 2 read by a loader process give, file by file, what one image at a time gives."""
    from commands.predict import predict_files
    from finetune.runtime import Precision

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", build_model("resnet18", 4, "none"), Checkpoint(
        "resnet18", list("abcd"), Preprocessing(32), {"head": "linear", "head_hidden": 8, "head_dropout": 0.0}))
    model, checkpoint = load_checkpoint(tmp_path / "model.pt")
    files = []
    for index, kind in enumerate(["good", "broken", "good", "missing", "good", "good", "thin"]):
        path = tmp_path / f"{index}_{kind}.png"
        if kind == "good":
            Image.effect_noise((40 + index * 9, 50), 60 + index * 20).convert("RGB").save(path)
        elif kind == "broken":
            path.write_bytes(b"not an image")
        elif kind == "thin":
            Image.new("RGB", (400, 20)).save(path)
        files.append(path)
    cpu = torch.device("cpu")
    one = predict_files(files, model, checkpoint, 3, cpu, Precision("none", cpu), batch_size=1, workers=0)
    batched = predict_files(files, model, checkpoint, 3, cpu, Precision("none", cpu), batch_size=2, workers=1)
    assert [row["file"] for row in batched] == [str(path) for path in files]
    assert ["error" in row for row in batched] == [False, True, False, True, False, False, True]
    assert "sides differ 20x" in batched[6]["error"]
    for single, together in zip(one, batched):
        assert single.keys() == together.keys()
        if "top" in single:
            assert [t["class_name"] for t in single["top"]] == [t["class_name"] for t in together["top"]]
            assert all(abs(a["probability"] - b["probability"]) < 1e-4 for a, b in zip(single["top"], together["top"]))


@pytest.mark.parametrize("field,value,message", [
    ("interpolation", "lanczos", "preprocessing interpolation 'lanczos' is not one of bilinear, bicubic"),
    ("resolution", "abc", "preprocessing resolution 'abc' is not a whole number"),
    ("mean", [0.5, 0.5], "preprocessing mean \\[0.5, 0.5\\] is not 3 numbers"),
    ("std", [0.2, 0.0, 0.2], "preprocessing std .* is not 3 numbers"),
    ("crop_fraction", None, "preprocessing crop_fraction None is not a number"),
])
def test_a_model_file_with_damaged_preprocessing_is_refused_with_the_field(tmp_path, field, value, message):
    """Before: the right format tag with `interpolation: lanczos` or `resolution: "abc"` gave a KeyError/TypeError
    traceback (in evaluate, gradcam, predict or export)."""
    save_checkpoint(tmp_path / "model.pt", build_model("resnet18", 3, "none"), record(["a", "b", "c"]))
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    payload["preprocessing"][field] = value
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(StageError, match=f"is damaged or was written by another version .*{message}"):
        load_checkpoint(tmp_path / "model.pt")


PLANTED_WEIGHTS = """
import os, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"state_dict": Payload()}}, "{path}")
"""


def test_refused_files_give_reasons_without_torchs_advice_to_run_them(tmp_path):
    """Before: refusals of planted pickles relayed torch's advice to re-run with weights_only=False (wrong advice
    for a file treated as hostile), and a file of zeros was "saved in the legacy .tar format"."""
    import subprocess
    import sys

    planted, marker = tmp_path / "planted.pt", tmp_path / "code_ran"
    subprocess.run([sys.executable, "-c", PLANTED_WEIGHTS.format(marker=marker, path=planted)], check=True)
    zeros = tmp_path / "zeros.pt"
    zeros.write_bytes(bytes(100_000))
    for path, reason in [(planted, "holds Python objects that loading would have to run, refused .*posix.system"),
                         (zeros, "not a PyTorch file \\(it starts with b'\\\\x00\\\\x00\\\\x00\\\\x00'")]:
        for load in (load_checkpoint, lambda p: build_model("resnet18", 3, str(p))):
            with pytest.raises(StageError, match=reason) as refused:
                load(path)
            assert "weights_only" not in str(refused.value).replace("weights_only=True", "") and "legacy" not in str(
                refused.value)
    assert not marker.exists()
