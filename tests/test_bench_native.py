"""cxr bench --perf (worker.ops.bench_native): perf samples -> a per-image CPU budget whose rows
add up, and the whole run under perf."""

from __future__ import annotations

import json

import pytest

from worker.ops import bench_native as nb

SITE = "/work/main/.venv/lib/python3.11/site-packages"
J = f"{SITE}/pillow.libs/libjpeg-6dc8d115.so.62.4.0"
IM = f"{SITE}/PIL/_imaging.cpython-311-x86_64-linux-gnu.so"
PY = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"
NP = f"{SITE}/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so"
TF = f"{SITE}/tensorflow/libtensorflow_cc.so.2"
SSL = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"
K = "[kernel.kallsyms]"
# Lines as `perf script -F comm,pid,time,ip,sym,dso` prints them (from a real run, paths named)
LINES = f"""\
         swapper     0 1796653381.926000:  ffffffff8224379b pv_native_safe_halt ({K})
         python3  7827 1796653381.927000:      7f1c2e25a162 [unknown] ({J})
         python3  7827 1796653381.928000:      7f1c2e25a123 [unknown] ({J})
         python3  7827 1796653381.929000:      7f1c2f0a1000 _ImagingResampleHorizontal_8bpc ({IM})
         python3  7827 1796653381.930000:      7f1c30000000 _PyEval_EvalFrameDefault ({PY})
         python3  7827 1796653381.931000:      7f1c31000000 PyArray_Nonzero ({NP})
      tf_Compute  7827 1796653381.932000:      7f1c32000000 Eigen::internal::EvalRange<>::run ({TF})
         python3  7817 1796653381.933000:      7f1c33000000 [unknown] ({SSL})
         python3  7817 1796653381.934000:  ffffffff81000000 clear_page_erms ({K})
             cxr  7693 1796653381.935000:      7f1c30000000 _PyEval_EvalFrameDefault ({PY})
       kdamond.0   107 1796653381.936000:  ffffffff81000001 damon_pa_apply_scheme ({K})
         python3  7818 1796653381.937000:      7f1c30000000 _PyEval_EvalFrameDefault ({PY})
         python3  7827 1796653399.000000:      7f1c2e25a162 [unknown] ({J})
not a sample line
"""
STACK_LOG = "cxr up: started watcher (pid 7817)\ncxr up: started worker (pid 7818)\n"


def test_samples_are_parsed_with_their_process_time_and_library():
    samples = nb.parse_samples(LINES.splitlines())
    assert len(samples) == 13
    assert (samples[0].comm, samples[0].pid) == ("swapper", 0)
    assert (samples[6].comm, samples[6].pid, samples[6].time) == ("tf_Compute", 7827,
                                                                  1796653381.932)
    libraries = [nb.library_of(s.dso, s.symbol) for s in samples[:12]]
    assert libraries == [
        "kernel (syscalls, page faults, scheduling)", "JPEG decoding (libjpeg-turbo)",
        "JPEG decoding (libjpeg-turbo)", "resize and grey (Pillow)", "Python interpreter",
        "numpy", "TensorFlow (forward pass, tf.data)", "SHA-256 (OpenSSL)",
        "kernel (syscalls, page faults, scheduling)", "Python interpreter",
        "kernel (syscalls, page faults, scheduling)", "Python interpreter"]
    # a site-packages path holds "python3" too: only libpython and the binary are the interpreter
    assert nb.library_of(f"{SITE}/foo/bar.so", "f") == nb.OTHER


def test_tensorflow_resize_is_told_from_the_rest_of_tensorflow():
    assert nb.library_of(f"{SITE}/tensorflow/libtensorflow_cc.so.2",
                         "tensorflow::functor::ResizeBilinear<float>") == "resize (TensorFlow)"


def test_the_budget_names_each_process_and_its_rows_add_up_to_the_window():
    samples = nb.parse_samples(LINES.splitlines())
    known = nb.stack_pids(STACK_LOG)
    assert known == {7817: "watcher", 7818: "Celery parent"}
    result = nb.budget(samples, (1796653381.9, 1796653382.0), known, images=2,
                       main_role="worker pool process", hz=500)
    per_sample = 1000.0 / 500 / 2  # ms of CPU per image that one sample stands for
    assert result["samples"] == 12  # the late sample lies outside the window
    assert result["roles"] == pytest.approx({
        "worker pool process": 6 * per_sample, "watcher": 2 * per_sample,
        "idle": per_sample, "the bench's own polling": per_sample,
        "other processes": per_sample, "Celery parent": per_sample})
    libraries = result["libraries"]
    assert libraries["worker pool process / JPEG decoding (libjpeg-turbo)"] == 2 * per_sample
    assert libraries["watcher / SHA-256 (OpenSSL)"] == per_sample
    assert not any(key.startswith("idle") for key in libraries)
    assert sum(libraries.values()) + result["roles"]["idle"] == pytest.approx(
        sum(result["roles"].values()))
    table = nb.render("service", result, cores=2)
    assert table[0] == "service: 2 images in 0.10 s, 12 samples of 100 expected (2 CPUs x 500 Hz)"
    assert table[2].split() == ["worker", "pool", "process", "6.00", "50%"]
    assert table[3].split()[-1] == "2.00" and "JPEG decoding" in table[3]
    assert table[-1].split()[-1] == "12.00"


def test_in_the_scripts_window_the_bench_process_is_the_script():
    samples = [nb.Sample("cxr", 7693, 10.0 + i / 100, "f", "/x/libjpeg.so") for i in range(5)]
    samples.append(nb.Sample("swapper", 0, 10.2, "halt", "[kernel.kallsyms]"))
    result = nb.budget(samples, (10.0, 11.0), {}, images=1, main_role="the script's process",
                       hz=100)
    assert result["roles"] == pytest.approx({"the script's process": 50.0, "idle": 10.0})


def test_without_perf_the_bench_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(nb.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs Linux perf .*apt-get install linux-perf"):
        nb.NativeProfile(tmp_path / "perf.data")


def _perf_or_skip(tmp_path):
    try:
        profile = nb.NativeProfile(tmp_path / "probe.data")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    profile.stop()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_cxr_bench_perf_budgets_the_pipeline_and_the_script(tmp_path, monkeypatch, capsys):
    """A small real run under perf: both windows are budgeted, their samples add up to wall
    time x CPUs, and the roles are the stack's own processes."""
    from tests.test_bench import _redis_or_skip
    from worker.cli import main

    _redis_or_skip()
    _perf_or_skip(tmp_path)
    monkeypatch.setenv("CXR_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("CXR_TF_THREADS", "1")
    out = tmp_path / "bench.json"
    code = main([
        "bench", "--backbone", "free", "--img-size", "32", "--images", "40",
        "--notebook-images", "2", "--latency-images", "1", "--latency-gap", "0.1",
        "--source-px", "200", "300", "--min-time", "0.1", "--baseline", "script", "--perf",
        "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "where the CPU went (perf, whole machine):" in printed
    result = json.loads(out.read_text())
    service = result["native"]["service (inbox -> done)"]
    script = result["native"]["the user's script, its fastest pass"]
    cores = result["machine"]["cores"]
    for window in (service, script):
        expected = window["seconds"] * cores * window["hz"]
        assert window["samples"] == pytest.approx(expected, rel=0.2), window
        assert sum(window["roles"].values()) == pytest.approx(
            window["samples"] * 1000.0 / window["hz"] / window["images"])
    assert service["images"] == 40 and script["images"] == 40
    assert {"worker pool process", "watcher"} <= set(service["roles"])
    assert service["roles"]["worker pool process"] > 0
    assert "the script's process" in script["roles"]
    assert (tmp_path / "work" / "perf.data").stat().st_size > 0
