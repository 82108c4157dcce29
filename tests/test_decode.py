"""worker.decode: every kind of bad file gets an informative reason; good files decode faithfully.

All inputs are generated in tmp_path with Pillow and numpy; nothing is committed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from db.exceptions import BadImageError
from trainer.imaging import jpeg_draft
from trainer.imaging.budget import decode_cost
from trainer.imaging.decode import (
    MIN_SIDE,
    declared_size,
    decode_bytes,
    decode_image,
    decode_many,
    sniff_bytes,
)

SIZE = 32
LIMIT = 60_000_000


def reason_for(path: Path, size: int = SIZE, max_pixels: int = LIMIT) -> str:
    with pytest.raises(BadImageError) as info:
        decode_image(path, size, max_pixels)
    return str(info.value)


def halves(width: int = 64, height: int = 64, dark: int = 20, bright: int = 230) -> np.ndarray:
    """Left half dark, right half bright: a pattern whose geometry survives resizing."""
    pixels = np.full((height, width), dark, dtype=np.uint8)
    pixels[:, width // 2:] = bright
    return pixels


def save(img: Image.Image, path: Path, fmt: str, **options) -> Path:
    img.save(path, fmt, **options)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header declares any size, with whatever IDAT follows (8-bit greyscale)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def assert_halves(out: np.ndarray, size: int = SIZE) -> None:
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    left, right = out[:, : size // 2 - 2, 0], out[:, size // 2 + 2:, 0]
    assert abs(float(left.mean()) - 20) < 4
    assert abs(float(right.mean()) - 230) < 4


# --- good inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"),
                                      ("L", "JPEG"), ("RGB", "JPEG")])
def test_grey_rgb_rgba_decode_to_grey_replicated_rgb(tmp_path, mode, fmt):
    img = Image.fromarray(halves()).convert(mode)
    path = save(img, tmp_path / f"x.{fmt.lower()}", fmt, quality=95)
    assert_halves(decode_image(path, SIZE, LIMIT))


def test_output_is_exactly_the_requested_square_for_any_aspect(tmp_path):
    path = save(Image.fromarray(halves(width=120, height=50)), tmp_path / "wide.png", "PNG")
    out = decode_image(path, 48, LIMIT)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert_halves(out, 48)


def test_png_named_jpg_is_accepted(tmp_path):
    path = save(Image.fromarray(halves()), tmp_path / "really_png.jpg", "PNG")
    assert sniff_bytes(path.read_bytes()) == "PNG"
    assert_halves(decode_image(path, SIZE, LIMIT))


def test_decode_bytes_matches_decode_image(tmp_path):
    path = save(Image.fromarray(halves()), tmp_path / "x.jpg", "JPEG")
    np.testing.assert_array_equal(decode_bytes(path.read_bytes(), SIZE, LIMIT),
                                  decode_image(path, SIZE, LIMIT))


def test_sixteen_bit_greyscale_keeps_its_contrast(tmp_path):
    # 12-bit data in a 16-bit PNG, as X-ray exports often are: convert("L") would clip it to
    # white and a plain >> 8 would leave it at 0..15.
    ramp = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)
    path = save(Image.fromarray(ramp), tmp_path / "xray16.png", "PNG")
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    out = decode_image(path, SIZE, LIMIT)[..., 0].astype(int)
    assert out.min() <= 5 and out.max() >= 250
    assert (np.diff(out[SIZE // 2]) >= 0).all()
    assert out.std() > 60


def test_full_range_sixteen_bit_matches_its_eight_bit_equivalent(tmp_path):
    eight = np.tile(np.linspace(0, 255, 64), (64, 1)).astype(np.uint8)
    sixteen = eight.astype(np.uint16) * 257
    path16 = save(Image.fromarray(sixteen), tmp_path / "a16.png", "PNG")
    path8 = save(Image.fromarray(eight), tmp_path / "a8.png", "PNG")
    diff = decode_image(path16, SIZE, LIMIT).astype(int) - decode_image(path8, SIZE, LIMIT)
    assert np.abs(diff).max() <= 1


def test_cmyk_jpeg_decodes_to_the_same_grey_as_rgb(tmp_path):
    rgb = Image.fromarray(halves()).convert("RGB")
    path = save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG", quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
    assert_halves(decode_image(path, SIZE, LIMIT))


def test_palette_png_transparency_is_composited_on_black(tmp_path):
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[:, 32:] = 1
    img = Image.frombytes("P", (64, 64), pixels.tobytes())
    img.putpalette([255, 255, 255, 200, 200, 200] + [0] * 762)
    path = save(img, tmp_path / "pal.png", "PNG", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = decode_image(path, SIZE, LIMIT)[..., 0]
    assert out[:, :14].max() == 0, "transparent white must become black, not white"
    assert abs(float(out[:, 18:].mean()) - 200) < 2


def test_rgba_and_la_alpha_are_composited_on_black(tmp_path):
    grey = np.full((64, 64), 255, dtype=np.uint8)
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255
    for mode in ("RGBA", "LA"):
        bands = [Image.fromarray(grey)] * (len(mode) - 1) + [Image.fromarray(alpha)]
        path = save(Image.merge(mode, bands), tmp_path / f"{mode}.png", "PNG")
        out = decode_image(path, SIZE, LIMIT)[..., 0]
        assert out[:, :14].max() == 0, mode
        assert out[:, 18:].min() == 255, mode


def test_one_bit_png(tmp_path):
    path = save(Image.fromarray(halves(dark=0, bright=255)).convert("1"), tmp_path / "b.png", "PNG")
    out = decode_image(path, SIZE, LIMIT)[..., 0]
    assert out[:, :14].max() == 0 and out[:, 18:].min() == 255


@pytest.mark.parametrize("orientation,bright_corner", [(1, "top_left"), (6, "top_right"),
                                                       (8, "bottom_left"), (3, "bottom_right")])
def test_exif_orientation_is_applied(tmp_path, orientation, bright_corner):
    pixels = np.full((48, 64), 10, dtype=np.uint8)
    pixels[:24, :32] = 240
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(pixels), tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes())
    out = decode_image(path, SIZE, LIMIT)[..., 0]
    h = SIZE // 2
    corners = {"top_left": out[:h, :h], "top_right": out[:h, h:],
               "bottom_left": out[h:, :h], "bottom_right": out[h:, h:]}
    means = {name: float(block.mean()) for name, block in corners.items()}
    assert max(means, key=means.get) == bright_corner, means


def test_large_jpeg_decodes_in_draft_mode_and_matches_a_full_decode(tmp_path, monkeypatch):
    side = 6000
    pixels = np.tile(np.linspace(0, 255, side).astype(np.uint8), (side, 1))
    pixels[: side // 3] //= 2
    path = save(Image.fromarray(pixels), tmp_path / "big.jpg", "JPEG", quality=90)
    del pixels
    drafted: list[tuple[int, int]] = []
    jpeg_draft.agrees()  # its own check decodes too: done before the spy counts
    real_draft = jpeg_draft.draft_gray

    def spy(*args):
        pixels = real_draft(*args)
        drafted.append(pixels.shape)
        return pixels

    monkeypatch.setattr(jpeg_draft, "draft_gray", spy)
    out = decode_image(path, 64, LIMIT)
    assert drafted == [(750, 750)], "a 6000 px JPEG should decode at 1/8 scale for 64 px output"
    with Image.open(path) as img:
        full = np.asarray(img.convert("L").resize((64, 64), Image.Resampling.BILINEAR))
    assert out.shape == (64, 64, 3)
    assert np.abs(out[..., 0].astype(int) - full).mean() < 2


@pytest.mark.parametrize(("resize", "keras_name"), [("nearest", "nearest"), ("area", "box"),
                                                    ("bicubic", "bicubic")])
def test_a_declared_resize_gives_keras_load_img_pixels_without_draft_mode(
        tmp_path, monkeypatch, resize, keras_name):
    """A model trained elsewhere gets exactly ``load_img``'s pixels: the full image, that filter.
    Draft mode (kept for the service's own resize) would change every pixel here."""
    from keras.utils import img_to_array, load_img

    rng = np.random.default_rng(4)
    pixels = (np.linspace(0, 200, 900)[None, :] + rng.integers(0, 55, (700, 900))).astype(np.uint8)
    path = save(Image.fromarray(pixels), tmp_path / "detail.jpg", "JPEG", quality=90)
    drafted: list[str] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, *a: drafted.append(resize) or real_draft(self, *a))
    want = img_to_array(load_img(path, target_size=(64, 64), interpolation=keras_name))
    out = decode_image(path, 64, LIMIT, resize=resize)
    assert drafted == [] and np.array_equal(out, want.astype(np.uint8))
    service = decode_image(path, 64, LIMIT)  # draft mode, without Pillow: tests/test_jpeg_draft.py
    assert drafted == [] and not np.array_equal(service, out)
    head = path.read_bytes()[:4096]
    assert decode_cost(head, 64, resize) > decode_cost(head, 64)


# --- bad inputs --------------------------------------------------------------------------------


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert reason_for(path) == "empty file (0 bytes)"
    with pytest.raises(BadImageError, match="empty file"):
        decode_bytes(b"", SIZE, LIMIT)


def test_truncated_jpeg_is_rejected_not_padded(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(halves(256, 256)).save(buf, "JPEG")
    data = buf.getvalue()
    path = tmp_path / "t.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert reason_for(path) == "truncated JPEG (the file ends early)"


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buf, "PNG")
    path = tmp_path / "t.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert reason_for(path) == "truncated PNG (the file ends early)"


@pytest.mark.parametrize("chunk", [b"IHDR", b"IDAT"])
def test_png_with_bad_crc(tmp_path, chunk):
    png = crafted_png(64, 64, zlib.compress(bytes(65 * 64)))
    start = png.index(chunk)
    length = struct.unpack(">I", png[start - 4:start])[0]
    crc_at = start + 4 + length
    broken = png[:crc_at] + bytes(b ^ 0xFF for b in png[crc_at:crc_at + 4]) + png[crc_at + 4:]
    path = tmp_path / "bad.png"
    path.write_bytes(broken)
    assert reason_for(path) == f"corrupt PNG (bad CRC in {chunk.decode()} chunk)"


@pytest.mark.parametrize("content,kind", [
    (b"Patient list\nname,id\n", "text"),
    (b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>", "HTML"),
    (b"\xef\xbb\xbf  <html lang='en'><head></head></html>", "HTML"),
])
def test_text_and_html_named_jpg(tmp_path, content, kind):
    path = tmp_path / "scan.jpg"
    path.write_bytes(content)
    assert reason_for(path) == f"not an image: looks like {kind}, although named .jpg"


def test_random_bytes_are_unrecognised(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(bytes([0, 1, 2, 250, 3]) * 100)
    assert reason_for(path) == (
        "not a JPEG, PNG or DICOM image: unrecognised content, although named .jpg")


def test_decompression_bomb_beyond_pillows_own_limit(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(crafted_png(100_000, 100_000, zlib.compress(bytes(1000))))
    assert path.stat().st_size < 200
    assert reason_for(path) == (
        "image too large: 100000x100000 pixels exceeds the limit of 60,000,000"
        " (possible decompression bomb)")


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    # The IDAT is far too short for 5000x5000: decoding would fail as truncated, so the
    # "too large" reason proves the limit was checked first.
    path = tmp_path / "big.png"
    path.write_bytes(crafted_png(5000, 5000, zlib.compress(bytes(100))))
    assert reason_for(path, max_pixels=1_000_000) == (
        "image too large: 5000x5000 pixels exceeds the limit of 1,000,000"
        " (possible decompression bomb)")
    jpeg = save(Image.fromarray(halves(1200, 1000)), tmp_path / "big.jpg", "JPEG")
    assert reason_for(jpeg, max_pixels=1_000_000).startswith(
        "image too large: 1200x1000 pixels exceeds the limit of 1,000,000")


def test_one_pixel_image_is_too_small(tmp_path):
    path = save(Image.new("L", (1, 1)), tmp_path / "dot.png", "PNG")
    assert reason_for(path) == f"image too small: 1x1 pixels (minimum {MIN_SIDE}x{MIN_SIDE})"
    ok = save(Image.fromarray(halves(MIN_SIDE, MIN_SIDE)), tmp_path / "min.png", "PNG")
    assert decode_image(ok, SIZE, LIMIT).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("fmt,name", [("GIF", "GIF"), ("TIFF", "TIFF"), ("BMP", "BMP"),
                                      ("WEBP", "WebP")])
def test_other_formats_are_named_whatever_the_extension(tmp_path, fmt, name):
    img = Image.fromarray(halves())
    own = save(img, tmp_path / f"x.{fmt.lower()}", fmt)
    disguised = save(img, tmp_path / "x.jpg", fmt)
    assert reason_for(own) == f"unsupported format {name} (JPEG, PNG and DICOM only)"
    assert reason_for(disguised) == (
        f"unsupported format {name} (JPEG, PNG and DICOM only), although named .jpg")
    assert sniff_bytes(disguised.read_bytes()[:512]) == name


def test_dicom_is_recognised_whatever_the_name(tmp_path):
    """DICOM itself is tested in test_dicom.py; here: an empty data set is sniffed as DICOM."""
    dicom = bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(200)
    for name in ("study.dcm", "study.jpg"):
        path = tmp_path / name
        path.write_bytes(dicom)
        assert sniff_bytes(dicom) == "DICOM"
        assert "DICOM" in reason_for(path)


def test_directory_named_like_an_image(tmp_path):
    path = tmp_path / "x.jpg"
    path.mkdir()
    assert reason_for(path) == "is a directory, not a file"


def test_vanished_file(tmp_path):
    assert reason_for(tmp_path / "gone.jpg") == "file vanished before it could be read"


def test_unreadable_file_is_permission_denied(tmp_path):
    save(Image.fromarray(halves()), tmp_path / "ok.jpg", "JPEG")
    secret = save(Image.fromarray(halves()), tmp_path / "secret.jpg", "JPEG")
    secret.chmod(0)
    if os.geteuid() != 0:
        assert reason_for(secret) == "permission denied (the service cannot read the file)"
        return
    # Root reads any file through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; a child process run
    # without those two capabilities obeys file modes like any user. ok.jpg is the control.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: root can read a chmod 000 file")
    drop = "-dac_override,-dac_read_search"
    code = (
        "import json, sys; from pathlib import Path\n"
        "from trainer.imaging.decode import decode_image\n"
        "from db.exceptions import BadImageError\nout = []\n"
        "for name in sys.argv[1:]:\n"
        "    try: out.append(decode_image(Path(name), 32, 10**6).shape[0])\n"
        "    except BadImageError as e: out.append(str(e))\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", "--",
         sys.executable, "-c", code, str(tmp_path / "ok.jpg"), str(secret)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [32, "permission denied (the service cannot read the file)"]


def test_decode_many_keeps_order_and_isolates_a_bad_file(tmp_path):
    paths = []
    for i, level in enumerate([30, 90, 150, 210]):
        paths.append(save(Image.new("L", (64, 64), level), tmp_path / f"{i}.png", "PNG"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>oops</html>")
    paths.insert(2, bad)
    results = decode_many(paths, SIZE, LIMIT, threads=3)
    assert len(results) == 5
    assert isinstance(results[2], BadImageError)
    assert str(results[2]) == "not an image: looks like HTML, although named .jpg"
    means = [int(r.pixels.mean()) for i, r in enumerate(results) if i != 2]
    assert means == [30, 90, 150, 210]
    assert decode_many([], SIZE, LIMIT) == []


# --- helpers -----------------------------------------------------------------------------------


def test_sniff_bytes_names_common_formats():
    assert sniff_bytes(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_bytes(b"\x00\x00\x00\x0cjP  \r\n\x87\n") == "JPEG 2000"
    assert sniff_bytes(b"\x00\x00\x00\x1cftypheic") == "HEIF"
    assert sniff_bytes(b"%PDF-1.7") == "PDF"
    assert sniff_bytes(b"<?xml version='1.0'?><svg></svg>") == "SVG"
    assert sniff_bytes(b"\x00\x01\x02") is None
    assert sniff_bytes(b"") is None


def test_declared_size_reads_headers_without_decoding(tmp_path):
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000
    for fmt, options in (("JPEG", {"exif": exif.tobytes()}), ("PNG", {})):
        buf = io.BytesIO()
        Image.fromarray(halves(70, 40)).save(buf, fmt, **options)
        assert declared_size(buf.getvalue()) == (70, 40), fmt
    assert declared_size(b"not an image") is None
