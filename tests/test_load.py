"""Load: 2,000 tiny files dropped at once into a running watcher + worker end in exactly 2,000
final rows; worker memory stays flat after warm-up and the watcher's stays bounded.

Memory is read from /proc (VmRSS) every 20 ms while the run drains (the 1,800 images after
warm-up can take under a second, and at every tenth of a second CI once got only 7 samples).
The bounds are generous on purpose: they catch unbounded growth (a leak per image), not
allocator noise.
"""

from __future__ import annotations

import statistics
import threading

import pytest
from helpers_models import register_tiny_bundle
from helpers_pipeline import child_pids, drop, pipeline_session, rss_kib, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

FILES = 2000
WARM_UP = 200
SLACK_KIB = 40 * 1024
SAMPLE_SECONDS = 0.02


def _unique_png(i: int) -> bytes:
    """A 32 px PNG, bright for odd ``i``, dark for even, whose first two pixels encode ``i``."""
    import io

    from PIL import Image

    img = Image.new("L", (32, 32), 245 if i % 2 else 10)
    img.putpixel((0, 0), i % 256)
    img.putpixel((1, 0), i // 256)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _sampler(pids, sink: list[tuple[int, int]], done: threading.Event, count) -> None:
    """Append (rows_done, rss_kib) until ``done``; pids() is re-read (pool children may change)."""
    while not done.wait(SAMPLE_SECONDS):
        total = sum(rss_kib(pid) or 0 for pid in pids())
        sink.append((count(), total))


def _flat(samples: list[tuple[int, int]]) -> tuple[float, float]:
    after = [rss for done, rss in samples if done >= WARM_UP]
    assert len(after) >= 8, f"too few samples after warm-up: {len(after)} of {len(samples)}"
    quarter = len(after) // 4
    return statistics.median(after[:quarter]), statistics.median(after[-quarter:])


def test_two_thousand_files_at_once(tmp_path):
    with pipeline_session(tmp_path) as p:
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
        names = [f"load-{i:04d}.png" for i in range(FILES)]
        payloads = [_unique_png(i) for i in range(FILES)]

        def finished() -> int:
            return p.count("SELECT count(*) FROM images WHERE status IN "
                           "('done', 'rejected', 'failed')")

        worker_samples: list[tuple[int, int]] = []
        watcher_samples: list[tuple[int, int]] = []
        done = threading.Event()
        master = p.worker.pid
        threads = [
            threading.Thread(target=_sampler, daemon=True, args=(
                lambda: child_pids(master), worker_samples, done, finished)),
            threading.Thread(target=_sampler, daemon=True, args=(
                lambda: [p.watcher.pid], watcher_samples, done, finished)),
        ]
        for thread in threads:
            thread.start()
        try:
            for name, data in zip(names, payloads, strict=True):
                drop(p.inbox, name, data)
            wait_until(lambda: finished() >= FILES, 360, f"{FILES} final rows")
        except AssertionError:
            p.dump()
            raise
        finally:
            done.set()
            for thread in threads:
                thread.join(timeout=5)

        assert p.count("SELECT count(*) FROM images") == FILES
        assert p.count("SELECT count(*) FROM images WHERE status = 'done'") == FILES
        assert p.count("SELECT count(DISTINCT file_name) FROM images") == FILES
        assert p.count("SELECT count(*) FROM predictions") == FILES
        assert not [x for x in p.inbox.iterdir() if x.is_file()]
        assert p.alive()

        first, last = _flat(worker_samples)
        warm = sum(1 for n, _ in worker_samples if n >= WARM_UP)
        print(f"worker RSS after warm-up: first quarter {first / 1024:.0f} MiB, "
              f"last quarter {last / 1024:.0f} MiB, {warm} of {len(worker_samples)} samples")
        assert last <= first * 1.25 + SLACK_KIB, (first, last)
        w_first, w_last = _flat(watcher_samples)
        w_peak = max(rss for _, rss in watcher_samples)
        print(f"watcher RSS: first quarter {w_first / 1024:.0f} MiB, last quarter "
              f"{w_last / 1024:.0f} MiB, peak {w_peak / 1024:.0f} MiB")
        assert w_last <= w_first * 1.25 + SLACK_KIB, (w_first, w_last)
        assert w_peak < 600 * 1024


def test_two_worker_processes_share_a_burst_without_doing_an_image_twice(tmp_path):
    """Batches take other images' rows, whose tasks then reach the other process: each such
    task must wait for the live holder, never take the row over (no second attempt)."""
    files = 240
    env = {"CXR_BATCH_SIZE": "8", "CXR_MESSAGE_SIZE": "8"}
    with pipeline_session(tmp_path, env=env, concurrency=2) as p:
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
        names = [f"pair-{i:04d}.png" for i in range(files)]
        for i, name in enumerate(names):
            drop(p.inbox, name, _unique_png(i))
        p.wait_final(names, timeout=300)
        assert p.count("SELECT count(*) FROM images WHERE status = 'done'") == files
        assert p.count("SELECT count(*) FROM predictions") == files
        assert p.count("SELECT max(attempts) FROM images") == 1, "an image was taken over"
        holders = p.count("SELECT count(DISTINCT claimed_by) FROM images")
        assert holders == 2, f"both worker processes should have claimed images ({holders})"
        assert "taking it over" not in p.log("worker")
