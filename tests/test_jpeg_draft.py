"""trainer.imaging.jpeg_draft: the service's JPEG resize without Pillow's Python gives Pillow's
pixels exactly, and hands every file it does not take (or cannot read cleanly) to Pillow.

Each case decodes the same bytes twice through ``trainer.imaging.decode``: once as it runs, once
with the simplejpeg path switched off (Pillow's draft mode, as before it existed).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from db.exceptions import BadImageError
from trainer.imaging import jpeg_draft
from trainer.imaging.decode import decode_bytes, decode_image

LIMIT = 60_000_000


def film(width: int, height: int, colour: bool = False, seed: int = 0) -> Image.Image:
    """Gradients and noise: detail that any difference in the IDCT or the scale would show."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 180, width)[None, :] + np.linspace(0, 40, height)[:, None]
    grey = (ramp + rng.integers(0, 70, (height, width))).clip(0, 255).astype(np.uint8)
    if not colour:
        return Image.fromarray(grey)
    tint = rng.integers(0, 60, (height, width, 3))
    return Image.fromarray((grey[..., None] * 0.75 + tint).clip(0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", **{"quality": 90, **options})
    return out.getvalue()


class Spy:
    """Counts what ``jpeg_draft.draft_gray`` returned: pixels, or None (Pillow's turn)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert jpeg_draft.agrees(), "simplejpeg and Pillow disagree on this installation"
        self.took = self.passed = 0
        real = jpeg_draft.draft_gray

        def draft_gray(*args):
            pixels = real(*args)
            self.took += pixels is not None
            self.passed += pixels is None
            return pixels

        monkeypatch.setattr(jpeg_draft, "draft_gray", draft_gray)


def pillow_only(monkeypatch: pytest.MonkeyPatch, run):
    """``run()`` with the simplejpeg path off: what the service did before it."""
    jpeg_draft.agrees()  # checked with the real decoder, before it is switched off
    with monkeypatch.context() as patch:
        patch.setattr(jpeg_draft, "draft_gray", lambda data, size: None)
        return run()


def reason(run) -> str:
    with pytest.raises(BadImageError) as info:
        run()
    return str(info.value)


TAKEN = {
    "grey, scale 1/4": (film(900, 700), {}, 64),
    "grey, progressive, odd sides": (film(1001, 777), {"progressive": True}, 64),
    "grey, restart markers": (film(640, 512), {"restart_marker_blocks": 3}, 64),
    "YCbCr 4:2:0, scale 1/2": (film(1200, 1000, colour=True), {}, 224),
    "YCbCr 4:2:2": (film(700, 900, colour=True), {"subsampling": 1}, 64),
    "YCbCr 4:4:4, progressive, optimized": (
        film(800, 600, colour=True), {"subsampling": 0, "progressive": True, "optimize": True},
        64),
    "grey, scale 1/8": (film(2100, 1400), {"quality": 75}, 64),
    "grey, smaller than twice the output (scale 1)": (film(100, 90), {}, 64),
    "grey, already the output size": (film(64, 64), {}, 64),
    "grey, a thin strip": (film(1500, 40), {}, 32),
}


@pytest.mark.parametrize("case", TAKEN, ids=list(TAKEN))
def test_simplejpeg_gives_pillows_draft_pixels_exactly(case, monkeypatch):
    img, options, size = TAKEN[case]
    data = jpeg(img, **options)
    spy = Spy(monkeypatch)
    fast = decode_bytes(data, size, LIMIT)
    assert (spy.took, spy.passed) == (1, 0), "this kind of JPEG should skip Pillow's Python"
    before = pillow_only(monkeypatch, lambda: decode_bytes(data, size, LIMIT))
    assert fast.shape == (size, size, 3) and fast.dtype == np.uint8
    assert np.array_equal(fast, before)


def test_files_and_bytes_take_the_same_path(tmp_path, monkeypatch):
    path = tmp_path / "film.jpeg"
    path.write_bytes(jpeg(film(900, 700)))
    spy = Spy(monkeypatch)
    assert np.array_equal(decode_image(path, 64, LIMIT), decode_bytes(path.read_bytes(), 64,
                                                                         LIMIT))
    assert spy.took == 2


def exif_rotated(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(img, exif=exif)


def with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """``data`` with one more marker segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + \
        data[2:]


def xmp_rotated(img: Image.Image) -> bytes:
    """Orientation 6 in XMP only, which Pillow's ``getexif`` reads too."""
    xmp = (b'http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF>'
           b'<rdf:Description tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    return with_segment(jpeg(img), 0xE1, xmp)


def cmyk(img: Image.Image) -> bytes:
    return jpeg(img.convert("CMYK"))


def damaged(img: Image.Image) -> bytes:
    """Entropy-coded bytes overwritten mid-scan: libjpeg warns and goes on, Pillow decodes."""
    data = bytearray(jpeg(img))
    middle = len(data) // 2
    data[middle:middle + 40] = bytes(range(1, 41))
    return bytes(data)


@pytest.mark.parametrize("make", [exif_rotated, xmp_rotated, cmyk, damaged],
                         ids=["EXIF orientation", "XMP orientation", "CMYK", "damaged scan"])
def test_what_it_does_not_take_pillow_decodes_as_before(make, monkeypatch):
    data = make(film(900, 700, colour=True))
    spy = Spy(monkeypatch)
    out = decode_bytes(data, 64, LIMIT)
    assert spy.took == 0
    assert np.array_equal(out, pillow_only(monkeypatch, lambda: decode_bytes(data, 64, LIMIT)))


BAD_HEADERS = {
    # libjpeg reads past these; Pillow's header parser does not, and refuses the file
    "APP0 too short for JFIF": (0xE0, b"JFIF\x00"),
    "APP14 too short for Adobe": (0xEE, b"Adobe"),
    "APP2 too short for an ICC profile": (0xE2, b"ICC_PROFILE\x00"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_a_header_pillow_refuses_is_refused_for_the_same_reason(case, monkeypatch):
    data = with_segment(jpeg(film(400, 300)), *BAD_HEADERS[case])
    fast = reason(lambda: decode_bytes(data, 64, LIMIT))
    assert fast == reason(lambda: pillow_only(monkeypatch, lambda: decode_bytes(data, 64, LIMIT)))
    tem = jpeg(film(400, 300))
    tem = tem[:2] + b"\xff\x01" + tem[2:]  # a TEM marker: libjpeg skips it, Pillow does not
    assert reason(lambda: decode_bytes(tem, 64, LIMIT)).startswith("corrupt")


def test_exif_orientation_still_turns_the_image(monkeypatch):
    wide = np.zeros((300, 600), dtype=np.uint8)
    wide[:, :300] = 230  # bright on the left; orientation 6 turns that to the top
    out = decode_bytes(exif_rotated(Image.fromarray(wide)), 32, LIMIT)[..., 0]
    assert out[:12].mean() > 200 > 30 > out[20:].mean()


def test_a_truncated_jpeg_gets_pillows_reason(monkeypatch):
    data = jpeg(film(900, 700))[:-4000]
    fast = reason(lambda: decode_bytes(data, 64, LIMIT))
    assert fast == reason(lambda: pillow_only(monkeypatch, lambda: decode_bytes(data, 64, LIMIT)))
    assert fast == "truncated JPEG (the file ends early)"


def test_the_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    data = jpeg(film(1200, 1000))
    spy = Spy(monkeypatch)
    said = reason(lambda: decode_bytes(data, 64, 1_000_000))
    assert said.startswith("image too large: 1200x1000 pixels exceeds the limit of 1,000,000")
    assert (spy.took, spy.passed) == (0, 0)


def test_a_file_too_large_to_read_whole_streams_through_pillow(tmp_path, monkeypatch):
    path = tmp_path / "film.jpeg"
    path.write_bytes(jpeg(film(900, 700)))
    monkeypatch.setattr(jpeg_draft, "WHOLE_READ_MAX", path.stat().st_size - 1)
    spy = Spy(monkeypatch)
    out = decode_image(path, 64, LIMIT)
    assert (spy.took, spy.passed) == (0, 0)
    assert np.array_equal(out, decode_bytes(path.read_bytes(), 64, LIMIT))


@pytest.mark.parametrize(("width", "height"), [(130, 129), (600, 257), (520, 520), (127, 500),
                                               (1030, 2049), (64, 64)])
def test_the_scale_is_the_one_pillows_draft_picks(width, height):
    with Image.open(io.BytesIO(jpeg(film(width, height)))) as img:
        img.draft("L", (64, 64))
        drafted = img.size
    scale = jpeg_draft.draft_scale(width, height, 64)
    assert drafted == (-(-width // scale), -(-height // scale))


def test_what_libjpeg_cannot_read_is_left_to_pillow():
    assert jpeg_draft.draft_gray(b"\xff\xd8\xff\xe0 not a header", 64) is None


def test_a_simplejpeg_that_disagrees_with_pillow_is_not_used(monkeypatch, caplog):
    """Each wheel bundles its own libjpeg-turbo: should an upgrade change simplejpeg's pixels,
    the service notices once a process and lets Pillow decode everything."""
    data = jpeg(film(900, 700))
    want = pillow_only(monkeypatch, lambda: decode_bytes(data, 64, LIMIT))
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: real(*a, **k) ^ 1)
    jpeg_draft.agrees.cache_clear()
    try:
        assert np.array_equal(decode_bytes(data, 64, LIMIT), want)
        assert jpeg_draft.agrees() is False
        assert "does not decode JPEGs to Pillow's pixels" in caplog.text
    finally:
        jpeg_draft.agrees.cache_clear()
