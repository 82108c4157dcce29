"""The bench's bookkeeping on what it measured, without running anything: the script's pass
that counts and when the table says its rate is too low to trust (tf.data's slow mode in every
pass), and the burst split at the end of its intake. The runs themselves are in test_bench."""

import pytest

from worker.ops.bench_script import best_script, fastest_pass_cores, script_lines
from worker.ops.bench_service import intake_phases


def _script(rounds, cores, cpus=2):
    return {"images_per_s": max(rounds), "rounds": rounds, "cores": cores, "cpus": cpus,
            "windows_unix": [[float(i), i + 1.0] for i in range(len(rounds))], "images": 1000,
            "batch_size": 32}


def _lines(script, service=200.0):
    return script_lines({"script": script,
                         "ratios": {"pipeline_over_script": service / script["images_per_s"]}})


def test_the_fastest_pass_counts_over_both_measurements_with_its_cores():
    before = _script([195.0, 290.0, 195.0], [1.3, 1.9, 1.4])
    after = _script([300.0, 195.0], [1.95, 1.2])
    best = best_script(before, after)
    assert best["images_per_s"] == 300.0
    assert best["rounds"] == [195.0, 290.0, 195.0, 300.0, 195.0]
    assert best["cores"] == [1.3, 1.9, 1.4, 1.95, 1.2]
    assert len(best["windows_unix"]) == 5
    assert fastest_pass_cores(best) == 1.95


def test_a_script_that_kept_to_about_one_core_in_every_pass_is_flagged():
    slow = _script([195.0, 195.1, 194.9], [1.3, 1.4, 1.2])
    lines = _lines(slow)
    assert lines[1].split() == ["service", "/", "script", f"{200.0 / 195.1:.2f}"]
    assert "kept 1.4 of 2 cores busy" in lines[2] and "run again" in lines[2]


def test_a_script_at_full_speed_is_not_flagged():
    assert len(_lines(_script([195.0, 310.0], [1.3, 1.9]))) == 2
    # measured on two cores only: on sixteen, tf.data may never fill them at full speed
    assert len(_lines(_script([900.0, 950.0], [6.0, 7.5], cpus=16))) == 2
    # a result written before cores were kept
    old = _script([310.0], [1.9])
    del old["cores"]
    assert fastest_pass_cores(old) is None and len(_lines(old)) == 2


def test_the_burst_is_split_at_the_end_of_its_intake():
    from datetime import UTC, datetime

    wall = 1_000_000.0

    def at(seconds: float) -> datetime:
        return datetime.fromtimestamp(wall + seconds, UTC).replace(tzinfo=None)  # as stored

    rows = {f"f{i}": ("done", at(done), at(received)) for i, (received, done) in
            enumerate([(0.1, 0.4), (0.2, 0.4), (0.3, 1.5), (0.5, 2.5)])}
    phases = intake_phases(rows, wall, elapsed=2.5)
    assert phases["intake_s"] == pytest.approx(0.5)
    assert phases["done_during_intake"] == 2
    assert phases["after_intake_images_per_s"] == pytest.approx(2 / 2.0)
    # nothing left once the intake ended: no rate to give
    done_early = {k: ("done", at(0.4), received) for k, (_, _, received) in rows.items()}
    assert intake_phases(done_early, wall, elapsed=0.5)["after_intake_images_per_s"] is None
