"""The review app's pieces without a browser: passwords, the loopback rule, the session key,
pictures found from rows only, and the worklist queries on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date

import pytest
from helpers_web import ROOT, seed
from sqlalchemy import text

from db.session import session_scope
from db.views import results_view
from db.worklist import (
    Filters,
    image_detail,
    iter_worklist,
    newer,
    predictions_of,
    view_columns,
    worklist,
)
from worker.settings import Settings
from worker.web import auth
from worker.web.pictures import heatmap_png


def test_password_hashes_verify_and_refuse():
    encoded = auth.hash_password("s3cret")
    assert encoded.startswith("scrypt$") and "s3cret" not in encoded
    assert auth.verify_password("s3cret", encoded)
    assert not auth.verify_password("s3creT", encoded)
    assert not auth.verify_password("s3cret", "scrypt$broken")
    assert auth.parse_users(f"alice:{encoded}, bob:{encoded}") == {"alice": encoded,
                                                                   "bob": encoded}
    with pytest.raises(auth.WebConfigError, match="never a plain password"):
        auth.parse_users("alice:hunter2")


def test_hash_password_command_prints_a_usable_entry():
    result = subprocess.run([sys.executable, "-m", "worker.cli", "web", "hash-password",
                             "--user", "alice"], input="pass word\n", capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    users = auth.parse_users(result.stdout.strip())
    assert auth.verify_password("pass word", users["alice"])


def test_no_open_app_beyond_loopback(tmp_path):
    open_app = Settings(data_dir=tmp_path, web_address="0.0.0.0")
    with pytest.raises(auth.WebConfigError, match="without sign-in"):
        auth.check_web_settings(open_app)
    users = f"alice:{auth.hash_password('x')}"
    auth.check_web_settings(open_app.model_copy(update={"web_users": users}))
    auth.check_web_settings(open_app.model_copy(update={"web_trusted_header": "X-User"}))
    auth.check_web_settings(Settings(data_dir=tmp_path, web_address="127.0.0.1"))
    result = subprocess.run([sys.executable, "-m", "worker.cli", "web", "--address", "0.0.0.0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "CXR_DATA_DIR": str(tmp_path), "CXR_WEB_USERS": ""})
    assert result.returncode == 2 and "without sign-in" in result.stderr


def test_session_key_is_made_once_and_private(tmp_path):
    settings = Settings(data_dir=tmp_path)
    first = auth.session_secret(settings)
    path = tmp_path / auth.SECRET_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert auth.session_secret(settings) == first and len(first) >= 32
    os.chmod(path, 0o644)
    with pytest.raises(auth.WebConfigError, match="readable by other users"):
        auth.session_secret(settings)
    assert auth.session_secret(settings.model_copy(update={"web_secret": "k" * 40})) == "k" * 40


def test_heatmaps_only_from_inside_the_heatmaps_folder(tmp_path):
    settings = Settings(data_dir=tmp_path)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
    (tmp_path / "heatmaps" / "ab").mkdir(parents=True)
    (tmp_path / "heatmaps" / "ab" / "x.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    (tmp_path / "heatmaps" / "ab" / "link.png").symlink_to(tmp_path / "secret.png")
    assert heatmap_png(settings, "heatmaps/ab/x.png") == png
    for hostile in ("secret.png", "heatmaps/../secret.png", str(tmp_path / "secret.png"),
                    "heatmaps/ab/link.png", "/etc/passwd", None):
        assert heatmap_png(settings, hostile) is None, hostile


def test_worklist_pages_filters_and_detail(db_url, tmp_path):
    ids = seed(db_url, tmp_path, n=7)
    with session_scope(db_url) as session:
        seen, before = [], None
        while page := worklist(session, Filters(), before, limit=3):
            seen += [r["id"] for r in page]
            before = page[-1]["id"]
        assert seen == sorted(ids, reverse=True)
        assert [r["id"] for r in iter_worklist(session, Filters(label="BACTERIA"))] == [
            ids[6], ids[4], ids[1]]
        assert {r["label"] for r in worklist(session, Filters(label="VIRUS"))} == {"VIRUS"}
        assert worklist(session, Filters(version=2)) == []
        assert len(worklist(session, Filters(version=1))) == 7
        assert worklist(session, Filters(since=date(2000, 1, 1), until=date(2000, 1, 2))) == []
        assert len(worklist(session, Filters(since=date.today(), until=date.today()))) == 7
        assert [r["id"] for r in newer(session, Filters(), ids[4])] == [ids[6], ids[5]]
        assert not worklist(session, Filters())[0].get("review")  # nothing flagged
        detail = image_detail(session, ids[0])
        assert detail["threshold"] == 0.5 and detail["stored_path"].startswith("archive/")
        predictions = predictions_of(session, ids[0])
        assert [p["current"] for p in predictions] == [False, True]
        assert predictions[0]["pneumonia_model"] == "pneumonia/v2"


def test_worklist_shows_review_flags_when_the_view_has_them(db_url, tmp_path):
    """The abstain migration's columns, set by hand on the view before it (0008)."""
    ids = seed(db_url, tmp_path, n=3)
    with session_scope(db_url) as session:
        definition = results_view("0008").replace(
            "SELECT ", "SELECT CASE WHEN i.id % 2 = 0 THEN 'uncertain' ELSE NULL END AS review, "
            "0.25 AS gate_score, ", 1)
        session.execute(text("DROP VIEW results"))
        session.execute(text(definition))
    with session_scope(db_url) as session:
        assert {"review", "gate_score"} <= view_columns(session)
        flagged = worklist(session, Filters(review="uncertain"))
        assert [r["id"] for r in flagged] == [i for i in reversed(ids) if i % 2 == 0]
        assert flagged[0]["gate_score"] == 0.25
        assert len(worklist(session, Filters(review="none"))) == len(ids) - len(flagged)


def test_cxr_up_runs_the_review_app_only_when_asked(tmp_path):
    from worker.ops.supervisor import child_specs

    settings = Settings(data_dir=tmp_path)
    assert "web" not in [s.name for s in child_specs(settings, flower=False)]
    web = [s for s in child_specs(settings, flower=False, web=True) if s.name == "web"]
    assert len(web) == 1 and web[0].argv[-1] == "web"
    result = subprocess.run([sys.executable, "-m", "worker.cli", "up", "--web"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "CXR_DATA_DIR": str(tmp_path / "var"),
                                 "CXR_WEB_ADDRESS": "0.0.0.0", "CXR_WEB_USERS": ""})
    assert result.returncode == 2 and "without sign-in" in result.stderr
    assert not (tmp_path / "var").exists()  # refused before anything started


def test_compose_web_service_needs_sign_in_and_stays_on_loopback(tmp_path):
    from test_compose import DOTENV, SERVICES, environment, interpolate

    service = SERVICES["web"]
    assert service["command"] == ["web"] and service["profiles"] == ["web"]
    assert [interpolate(p, {}) for p in service["ports"]] == ["127.0.0.1:8000:8000"]
    users = f"alice:{auth.hash_password('x')}"
    for env, refused in (({}, True), ({"WEB_USERS": users}, False),
                         ({"WEB_TRUSTED_HEADER": "X-Forwarded-User"}, False)):
        values = environment("web", {**DOTENV, **env})
        fields = {k[4:].lower(): v or None for k, v in values.items() if k.startswith("CXR_")}
        settings = Settings(_env_file=None, **{**fields, "data_dir": tmp_path})
        if refused:
            with pytest.raises(auth.WebConfigError):
                auth.check_web_settings(settings)
        else:
            auth.check_web_settings(settings)


def test_csv_cells_never_start_a_formula():
    from worker.web.pages import _csv_cell

    assert [_csv_cell(v) for v in ("=HYPERLINK(1)", "+1", "-2", "@x", "chest.png", None, 0.5)] \
        == ["'=HYPERLINK(1)", "'+1", "'-2", "'@x", "chest.png", "", "0.5"]


def test_the_model_input_is_served_only_from_the_hashed_file(db_url, tmp_path):
    from worker.web.pictures import Feed, model_input_png

    image = seed(db_url, tmp_path, n=1)[0]
    settings = Settings(data_dir=tmp_path, database_url=db_url)
    with session_scope(db_url) as session:
        row = image_detail(session, image)
    png, problem = model_input_png(settings, row["stored_path"], row["sha256"], Feed(40))
    assert problem is None and png.startswith(b"\x89PNG")
    import io

    from PIL import Image as PILImage
    assert PILImage.open(io.BytesIO(png)).size == (40, 40)
    with open(tmp_path / row["stored_path"], "ab") as fh:
        fh.write(b"tampered")
    png, problem = model_input_png(settings, row["stored_path"], row["sha256"], Feed(40))
    assert png is None and "changed after intake" in problem
