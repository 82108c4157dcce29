"""The script baseline's bookkeeping: which pass counts, and when the table says its rate is
too low to trust (tf.data's slow mode in every pass). The script itself runs in test_bench."""

from worker.ops.bench_script import best_script, fastest_pass_cores, script_lines


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
    # a result written before cores were kept
    old = _script([310.0], [1.9])
    del old["cores"]
    assert fastest_pass_cores(old) is None and len(_lines(old)) == 2
