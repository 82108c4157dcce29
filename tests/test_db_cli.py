"""`cxr db upgrade`, `cxr results` and `cxr models ...` as a user runs them."""

from __future__ import annotations

import csv
import io
import json

import pytest

from db import registry
from db.models import Image
from db.session import session_scope
from db.vocabulary import ImageStatus
from worker.cli import main


@pytest.fixture
def cli_env(monkeypatch, tmp_path, empty_db_url):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DATABASE_URL", empty_db_url)
    return empty_db_url


def test_commands_refuse_a_database_without_schema(cli_env, capsys):
    assert main(["results"]) == 2
    assert "Run: cxr db upgrade" in capsys.readouterr().err
    assert main(["models", "list"]) == 2


def test_upgrade_then_results_in_every_format(cli_env, capsys):
    assert main(["db", "upgrade"]) == 0
    assert "is at schema" in capsys.readouterr().out
    with session_scope(cli_env) as s:
        s.add(Image(sha256="c" * 64, file_name="a b.jpeg", status=ImageStatus.QUEUED))
        s.add(Image(sha256="d" * 64, file_name="x.jpg", status=ImageStatus.REJECTED, error="1x1"))
    assert main(["results"]) == 0
    out = capsys.readouterr().out
    assert "a b.jpeg" in out and "not a medical device" in out
    assert main(["results", "--format", "json", "--status", "rejected"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["file_name"], r["error"]) for r in rows] == [("x.jpg", "1x1")]
    assert main(["results", "--format", "csv", "--limit", "1"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(parsed) == 1 and "p_virus" in parsed[0]


def test_models_promote_rollback_keep_a_single_production(cli_env, capsys):
    main(["db", "upgrade"])
    with session_scope(cli_env) as s:
        for _ in range(2):
            registry.register_version(s, stage="infection", backbone="smallcnn")
    assert main(["models", "promote", "infection", "1"]) == 0
    assert main(["models", "promote", "infection", "v2"]) == 0
    assert "infection/v2 is now in production" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("production") == 1 and "archived" in listing
    assert main(["models", "rollback", "infection"]) == 0
    assert "infection/v1 is now in production" in capsys.readouterr().out
    assert main(["models", "show", "infection", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "production"
    assert main(["models", "promote", "infection", "7"]) == 2
    assert "no model infection/v7" in capsys.readouterr().err
