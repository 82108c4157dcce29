"""Bad input at pipeline level: every kind of strange file dropped together with good neighbours
into a running watcher + Celery worker (private Redis, real SQLite; PostgreSQL smoke when
``CXR_TEST_POSTGRES_URL`` is set). Each file ends with a status and reason (or a label), rejected
files stay in rejected/, nothing else is lost and both processes keep running.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers_dicom import make_ds, texture, to_bytes
from helpers_models import register_tiny_bundle
from helpers_pipeline import (
    POSTGRES_URL,
    drop,
    pipeline_session,
    png_bytes,
    postgres_schema,
    wait_until,
)
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes whose (valid, CRC-correct) header claims ``width x height`` pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def bad_crc_png() -> bytes:
    data = bytearray(png_bytes(200))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF
    return bytes(data)


def gray16_png() -> bytes:
    """12-bit data in a 16-bit PNG, mostly near the top of its range (bright after stretching)."""
    values = np.full((40, 40), 4000, dtype=np.uint16)
    values[:2, :2] = 0
    return _encode(Image.fromarray(values), "PNG")


def palette_alpha_png() -> bytes:
    img = Image.new("P", (40, 40), 1)
    img.putpalette([0, 0, 0, 250, 250, 250] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    return _encode(img, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    img = Image.new("L", (60, 40), 240)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return _encode(img, "JPEG", exif=exif.tobytes())


def large_jpeg() -> bytes:
    return _encode(Image.new("L", (4000, 3000), 235), "JPEG", quality=80)


BRIGHT, DARK = 245, 12
GOOD = {
    "good-bright-1.png": (png_bytes(BRIGHT), "PNEUMONIA"),
    "good-dark-2.png": (png_bytes(DARK), "NORMAL"),
    "good-bright-3.jpg": (_encode(Image.new("L", (48, 48), BRIGHT), "JPEG"), "PNEUMONIA"),
    "good-dark-4.png": (png_bytes(DARK + 3), "NORMAL"),
}
VALID = {  # odd but legal images: classified, with the label they should get
    "gray16.png": (gray16_png(), "PNEUMONIA"),
    "cmyk.jpg": (_encode(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "JPEG"), "PNEUMONIA"),
    "palette-alpha.png": (palette_alpha_png(), "PNEUMONIA"),
    "exif-rotated.jpg": (exif_rotated_jpeg(), "PNEUMONIA"),
    "large-4000x3000.jpg": (large_jpeg(), "PNEUMONIA"),
    "png-named.jpg": (png_bytes(DARK), "NORMAL"),
    "no-extension": (png_bytes(BRIGHT), "PNEUMONIA"),
    "name with spaces.png": (png_bytes(DARK), "NORMAL"),
    "ünïcødé-胸部.png": (png_bytes(BRIGHT), "PNEUMONIA"),
    "new\nline.png": (png_bytes(DARK), "NORMAL"),
    "1.2.826.0.1.3680043.8.498.7": (  # a DICOM as a PACS exports it: no extension, MONOCHROME1
        to_bytes(make_ds(np.full((48, 48), 255 - BRIGHT, np.uint8), WindowCenter=128,
                         WindowWidth=256, PhotometricInterpretation="MONOCHROME1")),
        "PNEUMONIA"),
}
_jpeg = _encode(Image.new("L", (64, 64), 128), "JPEG")
_tiff = _encode(Image.new("L", (40, 40), 128), "TIFF")
REJECTED = {  # name -> (bytes, words the recorded reason must contain)
    "zero.jpg": (b"", "empty file"),
    "truncated.jpg": (_jpeg[: len(_jpeg) // 2], "truncated JPEG"),
    "bad-crc.png": (bad_crc_png(), "bad CRC"),
    "text.jpg": (b"patient list, not an image\n" * 4, "looks like text, although named .jpg"),
    "page.jpg": (b"<!DOCTYPE html><html><body>404</body></html>", "looks like HTML"),
    "bomb.png": (bomb_png(), "decompression bomb"),
    "one-pixel.png": (_encode(Image.new("L", (1, 1), 200), "PNG"), "too small"),
    "anim.gif": (_encode(Image.new("L", (40, 40), 128), "GIF"), "unsupported format GIF"),
    "anim.png": (_encode(Image.new("L", (40, 40), 128), "PNG", save_all=True,
                         append_images=[Image.new("L", (40, 40), 9)]), "animated PNG (2 frames)"),
    "scan.tiff": (_tiff, "unsupported format TIFF"),
    "tiff-named.jpg": (_tiff, "unsupported format TIFF (JPEG, PNG and DICOM only), although named"
                              " .jpg"),
    "lateral.dcm": (to_bytes(make_ds(texture(8), ViewPosition="LL")), "lateral view"),
    "ct-slice.dcm": (to_bytes(make_ds(texture(12), bits_stored=12, Modality="CT")),
                     "DICOM modality CT is not a radiograph"),
    "truncated.dcm": (to_bytes(make_ds(texture(12), bits_stored=12))[:-1000], "truncated DICOM"),
    "bitmap.bmp": (_encode(Image.new("L", (40, 40), 128), "BMP"), "unsupported format BMP"),
}
JUNK = [".DS_Store", "upload.png.part", "draft.png~"]


def _write_slowly(path: Path, data: bytes, seconds: float, pieces: int = 8) -> None:
    """One open handle, ``pieces`` writes spread over ``seconds`` (a slow network copy)."""
    step = max(1, len(data) // pieces)
    with open(path, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(seconds / pieces)


def _drop_everything(inbox: Path, outside: Path) -> dict[str, str]:
    """Drop every kind; returns the expected label or 'rejected' per file name."""
    expected: dict[str, str] = {}
    for name, (data, label) in {**GOOD, **VALID}.items():
        drop(inbox, name, data)
        expected[name] = label
    for name, (data, _) in REJECTED.items():
        drop(inbox, name, data)
        expected[name] = "rejected"
    (inbox / "folder.jpg").mkdir()
    drop(inbox, "folder.jpg/inner.png", png_bytes(BRIGHT))
    expected["folder.jpg/inner.png"] = "PNEUMONIA"
    secret = outside / "outside-secret.png"
    secret.write_bytes(png_bytes(BRIGHT))
    (inbox / "link.png").symlink_to(secret)
    expected["link.png"] = "rejected"
    twin = png_bytes(BRIGHT)
    drop(inbox, "twin-a.png", twin)
    drop(inbox, "twin-b.png", twin)
    expected.update({"twin-a.png": "PNEUMONIA", "twin-b.png": "PNEUMONIA"})
    unreadable = drop(inbox, "unreadable.png", png_bytes(DARK))
    os.chmod(unreadable, 0)
    # root reads any file; any other service user cannot, and the row says so
    expected["unreadable.png"] = "NORMAL" if os.geteuid() == 0 else "rejected"
    for name in JUNK:
        (inbox / name).write_bytes(png_bytes(BRIGHT))
    with open(inbox / "vanishing.png", "wb") as fh:  # deleted before it was ever complete
        fh.write(png_bytes(BRIGHT)[:20])
        fh.flush()
        (inbox / "vanishing.png").unlink()
    _write_slowly(inbox / "slow.png", png_bytes(DARK), seconds=3.0)
    expected["slow.png"] = "NORMAL"
    return expected


def test_every_bad_input_gets_a_reason_and_nothing_else_is_lost(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with pipeline_session(tmp_path / "p") as p:
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
        expected = _drop_everything(p.inbox, outside)
        assert len(expected) >= 30
        rows = p.wait_final(list(expected), timeout=150)
        assert p.alive(), "watcher or worker died"
        for name, want in expected.items():
            row = rows[name]
            if want == "rejected":
                assert row["status"] == "rejected", (name, row)
                assert row["label"] is None and row["error"], (name, row)
            else:
                assert (row["status"], row["label"], row["error"]) == ("done", want, None), (
                    name, row)
        for name, (_, reason) in REJECTED.items():
            assert reason in rows[name]["error"], (name, rows[name]["error"])
        assert "symbolic link" in rows["link.png"]["error"]

        # rejected files are kept, privately, in rejected/
        paths = p.stored_paths()
        stored = {n: paths[n] for n, w in expected.items() if w == "rejected"}
        for name, path in stored.items():
            assert p.rejected_dir in path.parents, name
            assert path.is_symlink() or path.is_file(), name
        assert os.path.islink(stored["link.png"])
        assert (outside / "outside-secret.png").read_bytes()  # the link's target is untouched
        assert rows["zero.jpg"]["sha256"] != ""

        # nothing else: no rows for the folder, the junk or the vanished file
        assert set(rows) == set(expected), set(rows) ^ set(expected)
        left = sorted(x.name for x in p.inbox.rglob("*") if not x.is_dir())
        assert left == sorted(JUNK)
        assert (p.inbox / "folder.jpg").is_dir()

        # the same content twice: two rows, one prediction
        assert rows["twin-a.png"]["sha256"] == rows["twin-b.png"]["sha256"]
        assert p.count("SELECT count(*) FROM predictions WHERE sha256 = :s",
                       s=rows["twin-a.png"]["sha256"]) == 1

        # the service is still serving after all that
        drop(p.inbox, "after.png", png_bytes(BRIGHT))
        assert p.wait_final(["after.png"])["after.png"]["label"] == "PNEUMONIA"
        assert p.alive()


@pytest.mark.skipif(not POSTGRES_URL, reason="CXR_TEST_POSTGRES_URL not set")
def test_bad_input_smoke_on_postgresql(tmp_path):
    with postgres_schema() as (_, url), pipeline_session(tmp_path, url) as p:
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
        names = {"pg-good.png": png_bytes(BRIGHT), "pg-zero.jpg": b"",
                 "pg-bomb.png": bomb_png(), "pg-html.jpg": REJECTED["page.jpg"][0]}
        for name, data in names.items():
            drop(p.inbox, name, data)
        twin = png_bytes(DARK)
        drop(p.inbox, "pg-twin-1.png", twin)
        drop(p.inbox, "pg-twin-2.png", twin)
        rows = p.wait_final([*names, "pg-twin-1.png", "pg-twin-2.png"])
        assert rows["pg-good.png"]["label"] == "PNEUMONIA"
        assert {rows[n]["status"] for n in ("pg-zero.jpg", "pg-bomb.png", "pg-html.jpg")} == {
            "rejected"}
        assert [rows[n]["label"] for n in ("pg-twin-1.png", "pg-twin-2.png")] == ["NORMAL"] * 2
        wait_until(p.alive, 1, "processes alive")
