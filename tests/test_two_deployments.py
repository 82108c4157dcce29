"""Two deployments on one Redis and one queue name: each message carries its database's
deployment id, and a worker leaves the other deployment's messages to that deployment's workers
(it never classifies its own rows that happen to have the same ids).
"""

from __future__ import annotations

import pytest
from helpers_data import intake_file
from helpers_models import register_tiny_bundle
from helpers_pipeline import Pipeline, drop, pipeline_session, png_bytes, wait_until

from db.deployment import deployment_id
from db.migrate import upgrade
from db.session import session_scope
from worker.classify.celery_app import CLASSIFY_TASK, make_app
from worker.settings import Settings


def test_each_database_has_one_lasting_id(db_url, tmp_path):
    with session_scope(db_url) as session:
        first = deployment_id(session)
    with session_scope(db_url) as session:
        assert deployment_id(session) == first and len(first) == 32
    other = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade(other)
    with session_scope(other) as session:
        assert deployment_id(session) != first


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_leaves_another_deployments_message_to_its_workers(tmp_path):
    with pipeline_session(tmp_path / "a", start=False) as a:
        root_b = tmp_path / "b"
        db_b = f"sqlite:///{root_b / 'cxr.db'}"
        root_b.mkdir()
        upgrade(db_b)
        b = Pipeline(root_b, {**a.env, "CXR_DATA_DIR": str(root_b / "var"),
                              "CXR_DATABASE_URL": db_b}, db_b, None)
        b.inbox.mkdir(parents=True)
        try:
            for p in (a, b):
                register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
            # A's own image 1, queued, its message not sent yet
            own = Settings(data_dir=a.data_dir, database_url=a.db_url)
            taken = intake_file(drop(a.inbox, "a-own.png", png_bytes(245)), own, lambda _: None)
            assert taken is not None and taken.image_id == 1
            b.start_watcher()
            drop(b.inbox, "b-1.png", png_bytes(245))
            assert b.wait_status(["b-1.png"], {"queued"})["b-1.png"]["id"] == 1
            a.start_worker()
            wait_until(lambda: "another deployment" in a.log("worker"), 90, "A's warning")
            legacy = make_app(Settings(broker_url=a.env["CXR_BROKER_URL"],
                                       queue=a.env["CXR_QUEUE"]))
            legacy.send_task(CLASSIFY_TASK, args=[[999]], queue=a.env["CXR_QUEUE"])
            wait_until(lambda: "not in this database" in a.log("worker"), 60, "unknown ids")
            b.start_worker()
            rows = b.wait_final(["b-1.png"], timeout=120)
            assert (rows["b-1.png"]["status"], rows["b-1.png"]["label"]) == ("done", "PNEUMONIA")
            assert a.rows()["a-own.png"]["status"] == "queued"
            assert a.count("SELECT count(*) FROM predictions") == 0
            assert a.log("worker").count("another deployment") <= 2  # at most one a minute
        finally:
            b.stop_watcher()
            b.stop_worker()
