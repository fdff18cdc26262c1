"""Reading images safely: every image that reaches a transform is RGB, of bounded size and aspect ratio.

prepare reads the dataset's images through `open_image`, predict reads the user's photos through it, and the
loaders decode prepared images with `decode_prepared`. One rule for what is refused, with a reason a person
can read: decompression bombs, files Pillow cannot read or finds truncated, and images whose sides differ
more than MAX_ASPECT_RATIO times (a 60000x1 strip would ask a shorter-side resize to 224 px for ~12 GB).
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_ASPECT_RATIO = 10  # longer side / shorter side; panoramas are ~4, a thin strip is no photo to classify
MAX_PIXELS = 200_000_000  # Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS) warns at 89M and refuses at 179M
EXIF_ORIENTATION = 0x0112


class ImageRejected(ValueError):
    """An image that cannot or should not be used; the message is the reason, for lists and reports."""


def check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageRejected(f"empty image ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageRejected(f"{width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
                            f"{MAX_PIXELS / 1e6:.0f}-megapixel limit (a decompression bomb, or a scan to downsize)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageRejected(f"{width}x{height}: its sides differ {ratio:.0f}x, more than the "
                            f"{MAX_ASPECT_RATIO}x allowed (crop it to the subject)")


def open_header(source: bytes | Path) -> Image.Image:
    """The image with only its header read; its size checked before any pixel is decoded."""
    if isinstance(source, Path):
        check_regular_file(source)
    if isinstance(source, bytes) and not source:
        raise ImageRejected("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        raise ImageRejected("not an image format Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageRejected(f"{type(error).__name__}: {error}") from None
    check_size(*image.size)
    return image


def check_regular_file(path: Path) -> None:
    """Refuses what is not a regular file before it is opened: reading a FIFO waits for a writer forever, a
    device or socket never ends. An empty file is named as such, not as an unknown format."""
    try:
        info = path.stat()
    except OSError as error:
        raise ImageRejected(f"{error.strerror or type(error).__name__}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device")
        raise ImageRejected(f"not a regular file but {kind}: reading it could wait forever")
    if info.st_size == 0:
        raise ImageRejected("empty file (0 bytes)")


def exif_orientation(image: Image.Image) -> int:
    try:
        return image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is no reason to lose the picture
        return 1


def load_pixels(image: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decodes the pixels (a JPEG at 1/2, 1/4 or 1/8 scale in the DCT when draft_size allows: several times
    faster for big photos); applies the EXIF rotation; returns RGB. Truncated or corrupt data is refused (what
    Pillow sees: its JPEG decoder fills missing scan data with grey without a word, see check_jpeg_scan).

    Any other format is decoded whole, then reduced by whole factors to at least draft_size before its mode is
    converted: a 13000x13000 16-bit PNG or RGBA image made RGB at full size took +3.4 / +3.2 GB in float64 and
    composite temporaries, per prepare process."""
    try:
        if image.format == "JPEG" and draft_size:
            image.draft(None, draft_size)
        image.load()
        # in place: for an unrotated image exif_transpose would return a whole copy (+676 MB for 13000^2 RGBA)
        ImageOps.exif_transpose(image, in_place=True)
        if draft_size:
            image = reduced(image, min(image.width // draft_size[0], image.height // draft_size[1]))
        return to_rgb(image)
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, ValueError, MemoryError...
        raise ImageRejected(f"{type(error).__name__}: {error}") from None


TAIL_BYTES = 1 << 16  # of a JPEG's end: enough to see the padding before its end marker
SCAN_DATA_LOST = ("premature end", "instead of rst", "bad huffman code", "bad arithmetic code")
EXTRANEOUS = re.compile(r"(\d+) extraneous bytes before marker 0x([0-9a-f]{2})")
END_OF_IMAGE = b"\xff\xd9"


def scan_data_lost(warning: str, tail: bytes) -> bool:
    """Whether a libjpeg warning means pixels were not decoded from the file (scan data missing, unreadable, or
    left unread), rather than a harmless oddity. "N extraneous bytes before marker 0xd9" is padding before the
    end marker, which cameras and editors write, when those bytes are filler (0x00 or 0xFF); any other bytes
    there are scan data the decoder never used (a header claiming arithmetic coding over Huffman data)."""
    text = warning.lower()
    if any(words in text for words in SCAN_DATA_LOST):
        return True
    if match := EXTRANEOUS.search(text):
        count, marker = int(match.group(1)), match.group(2)
        end = tail.rfind(END_OF_IMAGE)
        if marker != "d9" or end < count:
            return True
        return not set(tail[end - count:end]) <= {0x00, 0xFF}
    return False  # unknown JFIF revision, Adobe transform code, a bad ICC marker...: the pixels are whole


def refuse_lost_scan_data(warnings: list[str], tail: bytes) -> None:
    lost = [warning for warning in warnings if scan_data_lost(warning, tail)]
    if lost:
        raise ImageRejected(f"truncated or corrupt JPEG data (libjpeg: {lost[0]}): part of its pixels would be "
                            f"invented")


SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L")
BAND_BYTES = 16 << 20  # of the source rows reduced at a time: memory beyond the decoded image stays this small
ALPHA_MODES = ("RGBA", "LA")  # Pillow's reduce converts these whole to premultiplied alpha first: done in bands


def band_rows(factor: int, width: int, bytes_per_pixel: int) -> int:
    """Output rows per band, so that a band's source rows hold about BAND_BYTES."""
    return max(1, BAND_BYTES // (factor * max(width, 1) * bytes_per_pixel))


def reduced(image: Image.Image, factor: int) -> Image.Image:
    """The image shrunk by averaging factor x factor blocks (Pillow's reduce), a band of rows at a time where a
    whole-image step would copy the image: 16-bit grey, which reduce does not take, straight to 8 bits; RGBA and LA,
    which reduce converts whole. A 13000x13000 image so costs its decode and a few MB, not 2-3x its size.
    Unchanged for a factor below 2."""
    if factor < 2:
        return image
    if image.mode in SIXTEEN_BIT_GREY:
        width, height = image.width // factor, image.height // factor
        out = np.empty((height, width), dtype=np.uint8)
        step = band_rows(factor, image.width, 8)
        for row in range(0, height, step):
            rows = min(step, height - row)
            band = np.asarray(image.crop((0, row * factor, width * factor, (row + rows) * factor)), dtype=np.float64)
            out[row:row + rows] = np.clip(band.reshape(rows, factor, width, factor).mean(axis=(1, 3)) / 257, 0,
                                          255).round()
        return Image.fromarray(out, "L")
    if image.mode in ("1", "P"):
        image = image.convert("RGBA" if "transparency" in image.info else "L" if image.mode == "1" else "RGB")
    if image.mode not in ALPHA_MODES:
        return image.reduce(factor)
    out = Image.new(image.mode, (-(-image.width // factor), -(-image.height // factor)))
    step = band_rows(factor, image.width, 8)  # the band and its premultiplied copy
    for row in range(0, out.height, step):
        band = image.crop((0, row * factor, image.width, min(image.height, (row + step) * factor)))
        out.paste(band.reduce(factor), (0, row))
    return out


def open_image(source: bytes | Path) -> Image.Image:
    """An RGB image, EXIF-rotated, or ImageRejected with the reason."""
    return load_pixels(open_header(source))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited onto white, 16-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
        return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image.convert("RGB")


_CAPTURE = None  # this process's file that fd 2 points to while libjpeg decodes


@contextmanager
def libjpeg_warnings() -> Iterator[list[str]]:
    """Collects what libjpeg writes to the process's stderr (fd 2) inside the block: its warnings ("Corrupt JPEG
    data: premature end of data segment") reach no Python decoder. Anything else written there is passed on."""
    global _CAPTURE
    if _CAPTURE is None:
        _CAPTURE = tempfile.TemporaryFile()
    _CAPTURE.seek(0)
    _CAPTURE.truncate()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(_CAPTURE.fileno(), 2)
    found: list[str] = []
    try:
        yield found
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        _CAPTURE.seek(0)
        lines = _CAPTURE.read().decode(errors="replace").splitlines()
        found += [line.strip() for line in lines if "JPEG" in line]
        others = [line for line in lines if "JPEG" not in line]
        if others:
            print("\n".join(others), file=sys.stderr)


DCT_REDUCTIONS = (8, 4, 2)  # libjpeg decodes a JPEG at 1/8, 1/4 or 1/2 scale in the DCT domain
START_OF_FRAME = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOFn markers


def dct_reduction(size: tuple[int, int], at_least: tuple[int, int]) -> int:
    """The largest of libjpeg's DCT-domain reductions that leaves an image of `size` (w, h) at least `at_least`
    (w, h) on both sides (Pillow's `Image.draft` rule); 1 when none does."""
    return next((r for r in DCT_REDUCTIONS if size[0] // r >= at_least[0] and size[1] // r >= at_least[1]), 1)


def jpeg_size(encoded: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG, read from its start-of-frame segment.

    The loaders need the size before choosing how to decode, for every image: Pillow's `Image.open` parses
    every header segment into Python objects, 15-30 us, 3-4% of a decode; this walk over the segment lengths
    takes ~2 us. Anything it does not understand goes to Pillow, which names the problem."""
    position = 2
    while position + 9 <= len(encoded) and encoded[position] == 0xFF:
        marker = encoded[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in START_OF_FRAME:
            height, width = struct.unpack_from(">HH", encoded, position + 5)
            if width and height:
                return width, height
            break
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length; none belongs here
            break
        position += 2 + struct.unpack_from(">H", encoded, position + 2)[0]
    return open_header(encoded).size


def decode_prepared(encoded: bytes, reduction: int = 1):
    """A prepared image (always a 3-channel JPEG without EXIF rotation, see prepare) as a uint8 CHW tensor, its
    sides divided by `reduction` (1, 2, 4 or 8; rounded up).

    Whole, TorchCodec decodes it, not PIL: ~10% faster on one core, and its output goes straight to torchvision's
    uint8 tensor kernels, which crop and resize at twice PIL's speed. Reduced, Pillow does (TorchCodec cannot):
    libjpeg computes only each 8x8 block's low frequencies, which saves the inverse DCT, upsampling and colour
    conversion of the dropped pixels but not the entropy decoding, most of the cost (BENCHMARKS.md). prepare
    made sure TorchCodec reads every stored image; one Pillow cannot read is decoded whole instead (the callers
    scale by the size they get), rather than checking every image with Pillow too (+18% on prepare's time, measured).
    """
    from torchcodec.decoders import decode_jpeg  # here: fetch and predict's readers need no torch

    if reduction > 1:
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            image = open_header(encoded)
            return pil_to_tensor(load_pixels(image, draft_size=(image.width // reduction, image.height // reduction)))
        except ImageRejected:
            pass
    return decode_jpeg(encoded, mode="RGB")


def refuse_impossible_scan(image: Image.Image, size: int) -> None:
    """A baseline JPEG needs at least 2 bits per 8x8 block of its first component (a DC code and an end-of-block
    code, even with optimised Huffman tables): a file too short for that is truncated, and is refused before
    it is decoded at its header's size (a 1 KB file claiming 13000x13000 would cost a 507 MB decode). A
    progressive JPEG can code runs of empty blocks in a few bits, so it gets no such bound."""
    if image.info.get("progressive") or image.info.get("progression"):
        return
    blocks = math.ceil(image.width / 8) * math.ceil(image.height / 8)
    if size < blocks // 4:
        raise ImageRejected(f"truncated JPEG data: {size:,} bytes cannot hold the scan of a {image.width}x"
                            f"{image.height} image (at least {blocks // 4:,} bytes)")


def check_jpeg_scan(encoded: bytes, image: Image.Image):
    """The JPEG decoded whole by training's decoder (TorchCodec's libjpeg-turbo, whose warnings, unlike Pillow's,
    can be read), as a uint8 CHW tensor, or None when that decoder cannot read it (Pillow may still). Refused
    (ImageRejected, with libjpeg's words) when scan data is missing or was left unread: libjpeg only warns, and
    the missing pixels would be invented (a file cut short that still ends in an EOI marker decodes with its
    bottom flat grey; a header claiming arithmetic coding over Huffman data decodes as noise). Harmless warnings
    (padding before the end marker) keep it. prepare and predict apply this one rule."""
    refuse_impossible_scan(image, len(encoded))
    try:
        with libjpeg_warnings() as warnings:
            whole = decode_prepared(encoded)
    except (RuntimeError, ImageRejected):
        return None
    refuse_lost_scan_data(warnings, encoded[-TAIL_BYTES:])
    return whole
