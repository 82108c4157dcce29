"""The bench's bookkeeping on what it measured, without running anything: the script's pass
that counts and how the table says which form of the script it was, and the burst split at the
end of its intake, and the CPU an image beside the script's. The runs themselves are in
test_bench."""

import pytest

from worker.ops.bench import _cpu_lines
from worker.ops.bench_script import (
    AS_WRITTEN,
    AUTOTUNE_OFF,
    best_script,
    fastest_pass,
    script_cpu_ms,
    script_lines,
)
from worker.ops.bench_service import cpu_ms_per_image, intake_phases


def _script(rounds, variants=None):
    variants = variants or [(AS_WRITTEN, AUTOTUNE_OFF)[i % 2] for i in range(len(rounds))]
    return {"images_per_s": max(rounds), "rounds": rounds, "variants": variants,
            "cores": [1.9] * len(rounds), "cpus": 2, "images": 1000, "batch_size": 32,
            "windows_unix": [[float(i), i + 1.0] for i in range(len(rounds))]}


def _lines(script, service=200.0):
    return script_lines({"script": script,
                         "ratios": {"pipeline_over_script": service / script["images_per_s"]}})


def test_the_fastest_pass_counts_over_both_measurements_with_its_form_and_window():
    before = _script([195.0, 290.0, 195.4, 250.0])
    after = _script([300.0, 280.0])
    best = best_script(before, after)
    assert best["images_per_s"] == 300.0
    assert best["rounds"] == [195.0, 290.0, 195.4, 250.0, 300.0, 280.0]
    assert best["variants"] == [AS_WRITTEN, AUTOTUNE_OFF] * 3
    assert len(best["windows_unix"]) == len(best["cores"]) == 6
    assert fastest_pass(best) == 4 and best["windows_unix"][4] == [0.0, 1.0]


def test_the_table_names_the_form_that_counted_and_the_best_of_each():
    # the autotuner's slow mode in every pass as written: the pass with it off counts
    lines = _lines(_script([195.0, 251.0, 195.4, 240.0]))
    assert lines[0].split()[-1] == "251.0"
    assert lines[1].split() == ["service", "/", "script", f"{200.0 / 251.0:.2f}"]
    assert lines[2] == ("(the script's fastest pass: autotuner off; best as written 195.4, "
                        "autotuner off 251.0 images/s)")
    assert "fastest pass: as written;" in _lines(_script([260.0, 251.0]))[2]


def test_a_result_written_before_the_forms_were_kept_has_no_form_line():
    old = _script([310.0, 300.0])
    del old["variants"]
    assert len(_lines(old)) == 2


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


def test_the_cpu_an_image_is_each_commands_difference_and_the_script_stands_beside_it():
    before = {"up": 1.0, "watch": 2.0, "worker": 10.0}
    after = {"up": 1.0, "watch": 2.7, "worker": 18.5, "redis-server": 0.2}
    cpu = cpu_ms_per_image(before, after, images=1000)
    assert cpu == pytest.approx({"watch": 0.7, "worker": 8.5, "redis-server": 0.2})
    assert cpu_ms_per_image({}, after, 1000) == {}  # no /proc: nothing, not a wrong figure
    script = _script([250.0, 280.0])
    script["cores"] = [1.5, 1.9]  # the fastest pass's CPU counts
    assert script_cpu_ms(script) == pytest.approx(1.9 / 280.0 * 1000.0)
    [line] = _cpu_lines({"pipeline": {"cpu_ms_per_image": cpu}, "script": script})
    assert line == ("(CPU an image: the service 9.40 ms (worker 8.50, watcher 0.70, "
                    f"redis-server 0.20); the script's fastest pass 6.79 ms, "
                    f"{6.7857 / 9.4:.2f} of the service's)")
    assert _cpu_lines({"pipeline": {}, "script": script}) == []  # a result from before
    assert "script" not in _cpu_lines({"pipeline": {"cpu_ms_per_image": cpu}})[0]
