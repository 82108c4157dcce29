"""What a file's header says is not trusted: an animated PNG is refused like a GIF or a
multi-frame DICOM, a reason names header values only from the DICOM vocabulary (a site may
write a patient's name into any coded element), and a ViewPosition that is neither frontal nor
lateral follows ``CXR_UNKNOWN_VIEW`` through the worker's real code, on both databases.
"""

from __future__ import annotations

import io

import pytest
from helpers_data import intake_file
from helpers_dicom import PATIENT_NAME, make_ds, texture, to_bytes
from helpers_models import register_tiny_bundle
from PIL import Image
from sqlalchemy import select

from db.exceptions import BadImageError
from db.models import Image as ImageRow
from db.session import session_scope
from trainer.imaging.decode import decode_bytes
from trainer.imaging.dicom_terms import NOT_SHOWN, view_policy
from worker.classify.batch import process_images
from worker.classify.inference import ModelCache
from worker.settings import Settings

SIZE, LIMIT = 32, 60_000_000
NAME = "DOE JANE"
"""A patient's name as a site might type it into a coded element: valid CS characters."""


def _png(frames: int) -> bytes:
    images = [Image.new("L", (64, 64), 40 * i) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "PNG", save_all=True, append_images=images[1:])
    return out.getvalue()


def _reason(data: bytes) -> str:
    with pytest.raises(BadImageError) as info:
        decode_bytes(data, SIZE, LIMIT)
    return str(info.value)


def test_an_animated_png_is_refused_and_a_one_frame_apng_is_not():
    assert Image.open(io.BytesIO(_png(3))).n_frames == 3  # Pillow would read frame one
    assert _reason(_png(3)) == "animated PNG (3 frames): send single-frame images"
    assert decode_bytes(_png(1), SIZE, LIMIT).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("attrs, start", [
    ({"Modality": NAME}, "DICOM modality"),
    ({"BodyPartExamined": NAME}, "DICOM body part"),
    ({"PhotometricInterpretation": NAME}, "colour DICOM"),
    ({"Modality": f"{NAME}\x1b[2J"}, "DICOM modality"),
])
def test_refusals_never_echo_header_text_outside_the_vocabulary(attrs, start):
    reason = _reason(to_bytes(make_ds(texture(8), **attrs)))
    assert reason.startswith(start) and NOT_SHOWN in reason, reason
    assert "DOE" not in reason and "\x1b" not in reason


def test_refusals_still_name_defined_terms():
    assert _reason(to_bytes(make_ds(texture(8), Modality="CT"))).startswith("DICOM modality CT ")
    assert "body part KNEE " in _reason(to_bytes(make_ds(texture(8), BodyPartExamined="KNEE")))


def test_the_view_policy():
    for view in (None, "", "PA", "ap", "LL"):
        assert view_policy(view, "reject") == (None, None)
    refused, note = view_policy("RLD", "reject")
    assert note is None and refused.startswith("unknown view (ViewPosition RLD)")
    refused, note = view_policy(PATIENT_NAME, "accept")
    assert refused is None and note == (
        f"unknown view (ViewPosition {NOT_SHOWN}) read as frontal (CXR_UNKNOWN_VIEW=accept)")


@pytest.mark.parametrize("policy", ["accept", "reject"])
def test_an_unknown_view_is_refused_or_taken_with_a_note(tmp_path, db_url, policy):
    settings = Settings(_env_file=None, data_dir=tmp_path / "var", database_url=db_url,
                        unknown_view=policy)
    settings.ensure_dirs()
    register_tiny_bundle(db_url, settings.models_path, "pneumonia")
    ids = {}
    for name, view in {"odd.dcm": "LLD", "named.dcm": NAME, "pa.dcm": "PA"}.items():
        uid = f"1.2.3.{len(ids) + 1}"
        path = settings.inbox_dir / name
        path.write_bytes(to_bytes(make_ds(texture(8), ViewPosition=view, SOPInstanceUID=uid)))
        ids[name] = intake_file(path, settings, lambda *_: None).image_id
    outcome = process_images(ids.values(), settings, ModelCache(settings.models_path))
    with session_scope(db_url) as session:
        rows = {r.file_name: (r.status, r.error) for r in session.scalars(select(ImageRow))}
    assert outcome[ids["pa.dcm"]] == "done" and rows["pa.dcm"] == ("done", None)
    for name in ("odd.dcm", "named.dcm"):
        status, error = rows[name]
        assert status == ("done" if policy == "accept" else "rejected"), (name, rows[name])
        assert error.startswith("unknown view (ViewPosition ") and f"={policy})" in error
        assert "DOE" not in error
    assert "(ViewPosition LLD)" in rows["odd.dcm"][1]
    if policy == "reject":
        assert list(settings.rejected_dir.iterdir())
