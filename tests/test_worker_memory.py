"""A worker's memory is bounded by ``CXR_DECODE_MEMORY_MB`` and the file-size limit, whatever
trails the images of a message: the reader keeps an image's own bytes (JPEG to EOI, PNG to
IEND) of a file larger than one read, still hashes every byte intake hashed, and drops the
bytes once decoded.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import uuid

import numpy as np
import pytest
from helpers_models import register_tiny_bundle
from helpers_pipeline import pipeline_session, wait_until
from PIL import Image

from trainer.imaging.decode import decode_bytes
from trainer.imaging.extent import EndFinder, _scan_marker
from worker.classify.reading import HEAD_BYTES, READ_CHUNK, read_image_bytes

MIB = 1 << 20


def _jpeg(level: int, size: int = 48) -> bytes:
    img = Image.new("L", (size, size), level)
    img.putpixel((0, 0), random.randrange(256))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90, progressive=bool(level % 2))
    return out.getvalue()


def _png(level: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (40, 40), level).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("image", [_jpeg(200), _jpeg(31), _png(90)])
def test_only_the_image_is_kept_and_every_byte_is_hashed(tmp_path, image):
    """A file too large for one read streams: what trails the image is hashed, then dropped."""
    path = tmp_path / "x"
    data = image + b"\xff\xd9 trailing \x00" * (2 * READ_CHUNK // 13)
    assert len(data) > HEAD_BYTES + READ_CHUNK
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with open(path, "rb") as fh:
        head = fh.read(100)
        assert read_image_bytes(fh, head, sha) == image
    with open(path, "rb") as fh:  # a changed byte after the image still fails the check
        changed = data[:-1] + b"!"
        path.write_bytes(changed)
        assert read_image_bytes(fh, fh.read(100), sha) is None


def _two_jpegs() -> bytes:
    return _jpeg(200) + _jpeg(31)


def _eoi_first() -> bytes:
    """An EOI before the image: Pillow reads on past it, so the reader must keep going too."""
    return b"\xff\xd8\xff\xd9" + _jpeg(120)


@pytest.mark.parametrize("image", [_jpeg(200), _jpeg(31), _png(90), _two_jpegs(),
                                   _eoi_first(), _png(90) + _png(10)])
def test_a_file_of_one_read_is_kept_whole_and_decodes_as_a_streamed_one(tmp_path, image):
    """Nearly every image fits in one read: kept as read (no scan for its end), still checked
    against the hash. Whatever trails the image, it decodes as the same content padded past
    one read (streamed, trimmed) and as the image alone."""
    kept = {}
    for name, padding in (("whole", 5000), ("streamed", 2 * READ_CHUNK // 13)):
        data = image + b"\xff\xd9 trailing \x00" * padding
        assert (len(data) <= HEAD_BYTES + READ_CHUNK) == (name == "whole")
        path = tmp_path / name
        path.write_bytes(data)
        with open(path, "rb") as fh:
            kept[name] = read_image_bytes(fh, fh.read(100), hashlib.sha256(data).hexdigest())
    assert kept["whole"] == image + b"\xff\xd9 trailing \x00" * 5000
    pixels = [decode_bytes(kept[name], 32, 10**6) for name in ("whole", "streamed")]
    assert np.array_equal(pixels[0], pixels[1])
    assert np.array_equal(pixels[0], decode_bytes(image, 32, 10**6))
    with open(tmp_path / "whole", "rb") as fh:  # a changed trailing byte still fails the check
        (tmp_path / "whole").write_bytes(kept["whole"][:-1] + b"!")
        assert read_image_bytes(fh, fh.read(100), hashlib.sha256(kept["whole"]).hexdigest()) \
            is None


def test_an_eoi_before_any_scan_leaves_the_end_unknown():
    image = _eoi_first()
    finder = EndFinder(image)
    assert finder.feed(image) is None and finder.unknown
    plain = _jpeg(120)
    assert EndFinder(plain).feed(plain + b"junk") == len(plain)


def test_the_end_is_found_across_chunk_boundaries():
    image = _jpeg(120, size=64)
    finder = EndFinder(image[:3])
    for n in range(3, len(image) + 1, 7):
        assert finder.feed(image[:n]) in (None, len(image))
    assert finder.feed(image + b"\x00" * 9) == len(image)


def _first_marker(buf: bytes, start: int) -> int | None:
    """The definition, byte by byte: 0xFF followed by neither 0x00, 0xFF nor RST0-7."""
    for i in range(start, len(buf) - 1):
        if buf[i] == 0xFF and buf[i + 1] not in (0x00, 0xFF, *range(0xD0, 0xD8)):
            return i
    return None


def test_the_scan_stops_at_the_first_marker_after_entropy_coded_data():
    rng = random.Random(7)
    for _ in range(5000):
        buf = bytes(rng.choice(b"\xff\x00\xd0\xd7\xd8\xd9\x12") for _ in range(rng.randint(0, 40)))
        start = rng.randint(0, len(buf))
        assert _scan_marker(buf, start) == _first_marker(buf, start)
        assert _scan_marker(bytearray(buf), start) == _first_marker(buf, start)


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _drop_sparse(inbox, name: str, data: bytes, size: int) -> None:
    """A valid image followed by ``size`` bytes of holes (``truncate -s``), renamed in."""
    tmp = inbox / f".{uuid.uuid4().hex}.part"
    tmp.write_bytes(data)
    if size > len(data):
        os.truncate(tmp, size)
    tmp.rename(inbox / name)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_images_padded_to_128_mib_stay_within_the_decode_budget(tmp_path):
    """Six JPEGs followed by 128 MiB of zeros each, in one message, against a 16 MiB budget:
    the pool process's peak memory grows by far less than one file (it read all of them, and
    kept them to the message's end, before)."""
    env = {"CXR_DECODE_MEMORY_MB": "16", "CXR_MESSAGE_SIZE": "16", "CXR_BATCH_SIZE": "8",
           "CXR_STABLE_SECONDS": "1"}
    with pipeline_session(tmp_path, env=env, start=False) as p:
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
        p.start_worker()
        p.start_watcher()
        _drop_sparse(p.inbox, "warm.jpeg", _jpeg(200), 0)
        p.wait_final(["warm.jpeg"])
        [pool] = wait_until(p.worker_children, 30, "the pool process")
        before = _hwm_kib(pool)
        names = [f"padded-{k}.jpeg" for k in range(6)]
        for k, name in enumerate(names):
            _drop_sparse(p.inbox, name, _jpeg(250 if k % 2 else 5), 128 * MIB)
        rows = p.wait_final(names, timeout=180)
        grown = (_hwm_kib(pool) - before) * 1024
        assert {rows[n]["status"] for n in names} == {"done"}, rows
        assert {rows[n]["label"] for n in names} == {"NORMAL", "PNEUMONIA"}
        assert p.count("SELECT count(DISTINCT task_id) FROM images WHERE file_name LIKE "
                       "'padded-%'") <= 2
    assert grown < 64 * MIB, f"peak grew by {grown / MIB:.0f} MiB"


def test_a_sparse_file_from_another_user_is_archived_sparse(tmp_path):
    """``truncate -s`` padding costs the archive no disk: the copy keeps the holes (and the
    bytes and hash are the same)."""
    from helpers_data import intake_file

    from worker.settings import Settings

    settings = Settings(data_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path}/c.db")
    settings.ensure_dirs()
    from db.migrate import upgrade

    upgrade(settings.db_url)
    image = _jpeg(200)
    _drop_sparse(settings.inbox_dir, "padded.jpeg", image, 64 * MIB)
    os.chown(settings.inbox_dir / "padded.jpeg", 10002, 10002)  # not ours: copied, not linked
    result = intake_file(settings.inbox_dir / "padded.jpeg", settings, lambda batch: None)
    [stored] = list(settings.archive_dir.rglob("*.jpeg"))
    assert result is not None and stored.stat().st_size == 64 * MIB
    assert stored.stat().st_blocks * 512 <= 2 * MIB  # the image's first chunk only
    assert stored.stem == hashlib.sha256(image + bytes(64 * MIB - len(image))).hexdigest()


def test_an_archived_file_over_the_size_limit_is_refused_before_it_is_read(db_url, tmp_path):
    """A limit lowered after intake: the worker refuses the file with the reason (moved to
    rejected/) instead of reading it."""
    from helpers_data import intake_file
    from sqlalchemy import select

    from db.models import Image as ImageRow
    from db.session import session_scope
    from worker.classify.batch import process_images
    from worker.classify.inference import ModelCache
    from worker.settings import Settings

    settings = Settings(data_dir=tmp_path / "var", database_url=db_url)
    settings.ensure_dirs()
    register_tiny_bundle(db_url, settings.models_path, "pneumonia")
    _drop_sparse(settings.inbox_dir, "big.jpeg", _jpeg(200), 4 * MIB)
    taken = intake_file(settings.inbox_dir / "big.jpeg", settings, lambda batch: None)
    small = settings.model_copy(update={"max_file_bytes": MIB})
    assert process_images([taken.image_id], small, ModelCache(settings.models_path)) == {
        taken.image_id: "rejected"}
    with session_scope(db_url) as session:
        row = session.scalars(select(ImageRow)).one()
        assert row.error.startswith("file too large: 4,194,304 bytes")
        assert row.stored_path.startswith("rejected/")
