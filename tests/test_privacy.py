"""Secrets and patient data stay where they belong: URLs printed redacted, a Redis password with
any characters works, file names can be kept out of logs and Flower, hostile names cannot
forge terminal output, log lines or spreadsheet formulas, and a swapped model is refused."""

from __future__ import annotations

import csv
import io
import logging
import subprocess
import time
from urllib.parse import quote

import pytest
from helpers_models import register_tiny_bundle
from hypothesis import example, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

from db.exceptions import CxrError, ModelNotFoundError
from db.models import Image
from db.session import make_engine, redacted_url, session_scope
from db.vocabulary import ImageStatus
from worker.cli import main
from worker.ops.supervisor import broker_answers, private_redis
from worker.settings import Settings

SECRET = "p@ss w#rd:%/?&=\"'\\"


def test_redacted_url_hides_every_secret_and_never_echoes_a_broken_url():
    encoded = quote(SECRET, safe="")
    assert SECRET not in redacted_url(f"redis://:{SECRET}@h:1/0")
    for url in (f"redis://:{encoded}@localhost:6379/0",
                f"postgresql+psycopg://u:{encoded}@db/x?sslmode=require",
                f"postgresql://u@db/x?password={encoded}&sslmode=require",
                f"redis://localhost/0?token={encoded}"):
        shown = redacted_url(url)
        assert encoded not in shown and SECRET not in shown and "***" in shown, shown
    assert "sslmode=require" in redacted_url(f"postgresql://u@db/x?password={encoded}&sslmode=require")
    assert redacted_url("sqlite:////var/lib/cxr/cxr.db") == "sqlite:////var/lib/cxr/cxr.db"
    assert redacted_url("redis://[::1:6379") == "(unparsable URL)"


def test_cxr_settings_prints_no_password(monkeypatch, tmp_path, capsys):
    encoded = quote(SECRET, safe="")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DATABASE_URL", f"postgresql://cxr@db/cxr?password={encoded}")
    monkeypatch.setenv("CXR_BROKER_URL", f"redis://:{encoded}@redis:6379/0")
    monkeypatch.setenv("CXR_FLOWER_BASIC_AUTH", f"admin:{SECRET}")
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert encoded not in out and SECRET not in out and "***" in out
    monkeypatch.setenv("CXR_BROKER_URL", f"redis://:{encoded}@[broken")
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert encoded not in out and "(unparsable URL)" in out


MARK = "Zq7MARK"
PASSWORD_CHARS = st.one_of(st.sampled_from("/?#@:%;&= +[]"),
                           st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")))


def _settings_output(**urls) -> str:
    import argparse
    import contextlib

    from worker.cli.config import cmd_settings

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cmd_settings(argparse.Namespace(markdown=False), Settings(_env_file=None, **urls))
    return out.getvalue()


@fuzz_settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(PASSWORD_CHARS, max_size=6), st.text(PASSWORD_CHARS, max_size=6),
       st.booleans())
@example("ab/cd", "", False)
@example("a?b", "", False)
@example("a#", "", False)
@example("p@", "", False)
def test_cxr_settings_never_prints_a_password_however_written(before, after, encode):
    """Any printable password, raw (as people write them) or percent-encoded: neither it nor
    the part of it the consumer (SQLAlchemy, kombu) reads as a host or path is printed."""
    password = before + MARK + after
    written = quote(password, safe="") if encode else password
    out = _settings_output(
        database_url=f"postgresql+psycopg://cxr:{written}@db:5432/cxr?sslmode=require",
        broker_url=f"redis://cxr:{written}@redis:6379/0;redis://:{written}@redis2:6379/0",
        flower_basic_auth=f"admin:{password}")
    assert MARK not in out, out
    assert quote(MARK) not in out and written not in out


def test_services_refuse_urls_their_readers_would_split_in_the_password(tmp_path, capsys):
    from worker.classify.celery_app import make_app

    with pytest.raises(CxrError) as refused:
        make_app(Settings(_env_file=None, broker_url=f"redis://:12/{MARK}@redis:6379/0"))
    assert MARK not in str(refused.value) and "percent-encode" in str(refused.value)
    secrets = Settings(_env_file=None, database_url=f"sqlite:///{MARK}", flower_basic_auth=MARK,
                       broker_url=f"redis://:{MARK}@redis:6379/0")
    assert MARK not in repr(secrets) and MARK not in str(secrets)  # a debug print shows none
    url = f"postgresql+psycopg://cxr:p@{MARK}@127.0.0.1:1/cxr"
    with pytest.raises(CxrError) as refused:
        make_engine(url)
    assert MARK not in str(refused.value)


def test_a_private_redis_takes_a_password_with_any_characters(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://:{quote(SECRET, safe='')}@127.0.0.1:{port}/0"
    spec = private_redis(url, tmp_path)
    assert SECRET not in " ".join(spec.argv)
    proc = subprocess.Popen(spec.argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not broker_answers(url, timeout=0.2):
            assert time.monotonic() < deadline, "the private redis never accepted the password"
            time.sleep(0.1)
        assert not broker_answers(f"redis://:{quote(SECRET[:-1], safe='')}@127.0.0.1:{port}/0",
                                  timeout=0.5)
    finally:
        proc.terminate()
        proc.wait(10)


def test_hidden_file_names_leave_only_the_image_id(monkeypatch):
    import worker.classify.broker

    shown = Settings(hide_file_names=True)
    assert shown.describe(7, "Doe^Jane 1970.png") == "image 7"
    named = Settings()
    assert named.describe(7, "evil\nINFO forged line\x1b[31m") == (
        "image 7 (evil\\nINFO forged line\\x1b[31m)")
    sent = []
    monkeypatch.setattr(worker.classify.broker.app, "send_task", lambda *a, **k: sent.append(k))
    monkeypatch.setattr(worker.classify.broker, "this_deployment", lambda _url: "0" * 32)
    monkeypatch.setattr(worker.classify.broker, "settings", shown)
    worker.classify.broker.enqueue_batch([(7, "Doe^Jane 1970.png"), (8, "Roe^Richard.png")])
    assert sent[-1]["argsrepr"] == "(image_ids=[7, 8])"
    monkeypatch.setattr(worker.classify.broker, "settings", named)
    worker.classify.broker.enqueue_batch([(9, "a\nb.png")])
    assert sent[-1]["argsrepr"] == "(image_ids=[9], files=['a\\\\nb.png'])"


@pytest.fixture
def cli_env(monkeypatch, tmp_path, db_url):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DATABASE_URL", db_url)
    return db_url


def test_results_escape_terminal_codes_and_spreadsheet_formulas(cli_env, capsys):
    hostile = "=HYPERLINK(\"http://x\")\x1b[2J\r\nforged.png"
    with session_scope(cli_env) as s:
        s.add(Image(sha256="c" * 64, file_name=hostile, status=ImageStatus.REJECTED,
                    error="@SUM(1)\x07"))
    assert main(["results"]) == 0
    table = capsys.readouterr().out
    assert "\x1b" not in table and "\x07" not in table and "\r" not in table
    assert "\\x1b[2J" in table
    assert main(["results", "--format", "csv"]) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["file_name"].startswith("'=HYPERLINK") and row["error"].startswith("'@SUM")


def _cxr_output(args: list[str], db_url: str, tmp_path, *, tty: bool) -> bytes:
    """What a real ``cxr`` process writes to its stdout: a pseudo-terminal or a pipe."""
    import os
    import sys

    env = {**os.environ, "CXR_DATA_DIR": str(tmp_path / "var"), "CXR_DATABASE_URL": db_url}
    if not tty:
        return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env,
                              stdout=subprocess.PIPE, check=True, timeout=120).stdout
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=env, stdout=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(120) == 0
    return b"".join(chunks)


def test_results_csv_escapes_control_characters_on_a_terminal_only(db_url, tmp_path):
    name = "scan\x1b]0;owned\x07\x1b[2J\x9b31m.png"
    with session_scope(db_url) as s:
        s.add(Image(sha256="d" * 64, file_name=name, status=ImageStatus.REJECTED, error="x\x1b[5m"))
    for fmt in ("csv", "table"):
        shown = _cxr_output(["results", "--format", fmt], db_url, tmp_path, tty=True)
        for raw in (b"\x1b", b"\x07", "\x9b".encode()):
            assert raw not in shown, (fmt, shown)
        assert b"scan\\x1b]0;owned\\x07" in shown
    piped = _cxr_output(["results", "--format", "csv"], db_url, tmp_path, tty=False)
    [row] = list(csv.DictReader(io.StringIO(piped.decode())))
    assert row["file_name"] == name and row["error"] == "x\x1b[5m"


@pytest.mark.parametrize("args, message", [
    (["--limit", "-1"], "between 0"), (["--limit", "10" * 30], "between 0"),
    (["--limit", "ten"], "whole number"), (["--since", "0001-01-01"], "before 1970"),
    (["--since", "yesterday"], "not an ISO date"),
])
def test_results_arguments_fail_in_one_line(cli_env, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["results", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cxr results: error:") and message in last


def test_a_worker_refuses_a_bundle_whose_files_changed(tmp_path, db_url, caplog):
    from worker.classify.inference import ModelCache

    settings = Settings(data_dir=tmp_path / "var", database_url=db_url)
    register_tiny_bundle(db_url, settings.models_path, "pneumonia")
    manifest = settings.models_path / "pneumonia" / "v1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"threshold": 0.5', '"threshold": 0.01'))
    with session_scope(db_url) as session, pytest.raises(ModelNotFoundError,
                                                         match="not the ones registered"):
        ModelCache(settings.models_path).current(session)


def test_log_lines_name_images_through_describe_only(caplog, tmp_path, db_url):
    """With names hidden, a whole intake and classification logs no file name."""
    from helpers_models import register_tiny_bundle as publish
    from PIL import Image as PILImage

    from worker.classify.batch import process_images
    from worker.classify.inference import ModelCache
    from worker.inbox.intake import intake_files

    settings = Settings(data_dir=tmp_path / "var", database_url=db_url, hide_file_names=True)
    settings.ensure_dirs()
    publish(db_url, settings.models_path, "pneumonia")
    PILImage.new("L", (40, 40), 200).save(settings.inbox_dir / "Doe^Jane.png")
    (settings.inbox_dir / "Roe^Rick.png").write_bytes(b"not an image")
    with caplog.at_level(logging.DEBUG):
        results = intake_files(sorted(settings.inbox_dir.iterdir()), settings, lambda b: None)
        process_images([r.image_id for r in results], settings, ModelCache(settings.models_path))
    assert "image" in caplog.text
    assert "Doe" not in caplog.text and "Roe" not in caplog.text
