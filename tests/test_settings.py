"""Settings: defaults that work with nothing configured, CXR_* overrides, README documents all."""

from __future__ import annotations

from pathlib import Path

from worker.settings import Settings, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_work_on_one_machine(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(f"CXR_{name.upper()}", raising=False)
    s = Settings()
    assert s.inbox_dir == tmp_path / "var" / "inbox"
    assert s.models_path == tmp_path / "var" / "models"
    assert s.db_url == f"sqlite:///{tmp_path / 'var' / 'cxr.db'}"
    assert s.broker_url == "redis://localhost:6379/0"
    s.ensure_dirs()
    for sub in ("inbox", "archive", "rejected", "models"):
        assert (tmp_path / "var" / sub).is_dir()
    assert (tmp_path / "var" / "archive").stat().st_mode & 0o077 == 0


def test_environment_and_dotenv_override(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CXR_BATCH_SIZE=7\n")
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CXR_DATABASE_URL", "postgresql+psycopg://u@h/db")
    s = Settings()
    assert s.batch_size == 7
    assert s.archive_dir == tmp_path / "data" / "archive"
    assert s.db_url == "postgresql+psycopg://u@h/db"


def test_readme_documents_every_setting():
    text = README.read_text()
    missing = [var for var, _, _ in settings_table() if f"`{var}`" not in text]
    assert not missing, f"README settings table lacks {missing}; run: cxr settings --markdown"
