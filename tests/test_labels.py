"""Ground truth in and out: the labels table, `cxr labels import|add|export`, both backends."""

from __future__ import annotations

import csv
import io

import pytest

from db.exceptions import LabelError
from db.labels import add_label, current_labels
from db.models import Image
from db.session import session_scope
from db.vocabulary import ImageStatus
from worker.cli import main


def _images(db_url: str, n: int = 4) -> list[int]:
    with session_scope(db_url) as s:
        rows = [Image(sha256=f"{i:064x}", file_name=f"f{i}.png", status=ImageStatus.DONE,
                      sop_instance_uid=f"1.2.3.{i}", accession_number="ACC1" if i < 2 else None)
                for i in range(n)]
        rows.append(Image(sha256=f"{0:064x}", file_name="twin.png", status=ImageStatus.DONE))
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def test_a_later_label_supersedes_and_the_earlier_stays(db_url):
    ids = _images(db_url)
    with session_scope(db_url) as s:
        first = add_label(s, ids[0], "bacteria", "review", "dr a")
        add_label(s, ids[0], "VIRUS", "report", "dr b")
        add_label(s, ids[1], "NORMAL", "import", "pacs")
    with session_scope(db_url) as s:
        assert current_labels(s) == {ids[0]: "VIRUS", ids[1]: "NORMAL"}
        assert current_labels(s, [ids[1], ids[2]]) == {ids[1]: "NORMAL"}
        assert current_labels(s, []) == {}
    assert first > 0
    with session_scope(db_url) as s, pytest.raises(LabelError, match="unknown label"):
        add_label(s, ids[0], "COVID", "review", "x")
    with session_scope(db_url) as s, pytest.raises(LabelError, match="no image"):
        add_label(s, 10**6, "NORMAL", "review", "x")
    with session_scope(db_url) as s, pytest.raises(LabelError, match="who"):
        add_label(s, ids[0], "NORMAL", "review", " ")


@pytest.fixture
def cli_db(monkeypatch, tmp_path, db_url):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DATABASE_URL", db_url)
    return db_url


def test_import_dry_run_then_import_add_and_export(cli_db, tmp_path, capsys):
    ids = _images(cli_db)
    sheet = tmp_path / "truth.csv"
    sheet.write_text(f"sha256,label\n{0:064x},virus\n{1:064x},NORMAL\n{'f' * 64},BACTERIA\n")
    assert main(["labels", "import", str(sheet), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 line(s) matched by sha256: would label 3 image(s)" in out
    assert f"line 4: no image with sha256 {'f' * 64}" in out
    with session_scope(cli_db) as s:
        assert current_labels(s) == {}
    assert main(["labels", "import", str(sheet), "--by", "dr c", "--source", "report"]) == 0
    with session_scope(cli_db) as s:  # the sha256 twin is labelled too
        assert current_labels(s) == {ids[0]: "VIRUS", ids[1]: "NORMAL", ids[4]: "VIRUS"}
    by_accession = tmp_path / "acc.csv"
    by_accession.write_text("accession_number,label\nACC1,PNEUMONIA\n")
    assert main(["labels", "import", str(by_accession)]) == 0
    assert main(["labels", "add", str(ids[2]), "bacteria", "--by", "dr d"]) == 0
    capsys.readouterr()
    assert main(["labels", "export"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {(int(r["id"]), r["label"], r["labelled_by"]) for r in rows} == {
        (ids[0], "PNEUMONIA", "import"), (ids[1], "PNEUMONIA", "import"),
        (ids[2], "BACTERIA", "dr d"), (ids[4], "VIRUS", "dr c")}
    assert main(["labels", "export", "--history"]) == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 6


def test_a_bad_line_imports_nothing(cli_db, tmp_path, capsys):
    ids = _images(cli_db)
    sheet = tmp_path / "bad.csv"
    sheet.write_text(f"id,label\n{ids[0]},NORMAL\n{ids[1]},COVID\n,VIRUS\n")
    assert main(["labels", "import", str(sheet)]) == 2
    err = capsys.readouterr().err
    assert "nothing imported, 2 bad line(s)" in err and "line 3" in err and "line 4" in err
    (tmp_path / "nokey.csv").write_text("file_name,label\na.png,NORMAL\n")
    assert main(["labels", "import", str(tmp_path / "nokey.csv")]) == 2
    with session_scope(cli_db) as s:
        assert current_labels(s) == {}
