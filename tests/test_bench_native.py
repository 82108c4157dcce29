"""cxr bench --perf (worker.ops.bench_native): perf samples -> a per-image CPU budget whose rows
add up, and the whole run under perf."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from db.exceptions import CxrError
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
STACK_LOG = """earlier run: cxr up: started watcher (pid 1)
cxr up: started watcher (pid 7817)
cxr up: started worker (pid 7818)
"""
BENCH_PID = 7693


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
    # simplejpeg links libjpeg-turbo into its own module (trainer.imaging.jpeg_draft)
    assert nb.library_of(f"{SITE}/simplejpeg/_jpeg.cpython-311-x86_64-linux-gnu.so",
                         "[unknown]") == "JPEG decoding (libjpeg-turbo)"
    # a site-packages path holds "python3" too: only libpython and the binary are the interpreter
    assert nb.library_of(f"{SITE}/foo/bar.so", "f") == nb.OTHER


def test_only_tensorflow_resizes_count_as_its_resize():
    assert nb.library_of(TF, "tensorflow::functor::ResizeBilinear<float>") == \
        "resize (TensorFlow)"
    assert nb.library_of(PY, "dictresize") == "Python interpreter"
    assert nb.library_of(NP, "PyArray_Resize") == "numpy"


def test_the_budget_names_each_process_and_its_rows_add_up_to_the_window():
    samples = nb.parse_samples(LINES.splitlines())
    processes = nb.started_processes(STACK_LOG.split("\n", 1)[1])  # this run's part only
    assert processes == {"watcher": 7817, "worker": 7818}
    known = nb._roles({"supervisor": 7790, **processes}, BENCH_PID)
    result = nb.budget(samples, (1796653381.9, 1796653382.0), known, images=2, hz=500)
    per_sample = 1000.0 / 500 / 2  # ms of CPU per image that one sample stands for
    assert result["samples"] == 12  # the late sample lies outside the window
    assert result["roles"] == pytest.approx({
        "worker pool process": 6 * per_sample, "watcher": 2 * per_sample,
        "idle": per_sample, nb.BENCH: per_sample,
        "other processes": per_sample, "Celery parent": per_sample})
    libraries = result["libraries"]
    assert libraries["worker pool process / JPEG decoding (libjpeg-turbo)"] == 2 * per_sample
    assert libraries["watcher / SHA-256 (OpenSSL)"] == per_sample
    assert not any(key.startswith("idle") for key in libraries)
    assert sum(libraries.values()) + result["roles"]["idle"] == pytest.approx(
        sum(result["roles"].values()))
    result["cpus"] = 2  # as on the machine the lines came from
    table = nb.render("service", result)
    assert table[0] == "service: 2 images in 0.10 s, 12 samples of 100 expected (2 CPUs x 500 Hz)"
    assert table[2].split() == ["worker", "pool", "process", "6.00", "50%"]
    assert table[3].split()[-1] == "2.00" and "JPEG decoding" in table[3]
    assert table[-1].split()[-1] == "12.00"


class FakeProfile:
    """Samples by window, as NativeProfile.samples gives them, without perf."""

    hz, path = 100, "perf.data"

    def __init__(self, fail: bool = False):
        self.fail, self.asked = fail, []

    def samples(self, window):
        self.asked.append(window)
        if self.fail:
            raise subprocess.CalledProcessError(1, ["perf", "script"], stderr="truncated file")
        return [nb.Sample("python3", BENCH_PID, window[0] + i / 100, "f", "/x/libjpeg.so")
                for i in range(5)] + [nb.Sample("swapper", 0, window[0], "halt", K)]


def _results(script: bool) -> dict:
    pipeline = {"window_unix": [100.0, 101.0], "images": 1,
                "processes": {"supervisor": 5, "watcher": 6, "worker": 7}}
    rounds = [200.0, 400.0, 300.0]
    return {"pipeline": pipeline, "script": {
        "rounds": rounds, "images": 1, "windows_unix": [[10.0, 11.0], [20.0, 21.0],
                                                        [30.0, 31.0]]} if script else None}


def test_the_scripts_window_is_its_fastest_pass_in_the_benchs_own_process():
    profile = FakeProfile()
    native = nb.native_budgets(profile, _results(script=True), BENCH_PID)
    assert profile.asked == [(100.0, 101.0), (20.0, 21.0)]  # the 400 images/s pass
    script = native["the user's script, its fastest pass"]
    assert script["roles"] == pytest.approx({"the script (in the bench's process)": 50.0,
                                             "idle": 10.0})
    # in the service's window the bench's process is only the bench, never the "main" one
    assert native["service (inbox -> done)"]["roles"][nb.BENCH] == pytest.approx(50.0)
    printed = nb.native_lines({"native": native})
    assert printed[1] == "where the CPU went (perf, whole machine):"
    assert any(line.startswith("the user's script, its fastest pass:") for line in printed)


def test_without_the_script_only_the_service_is_budgeted():
    native = nb.native_budgets(FakeProfile(), _results(script=False), BENCH_PID)
    assert list(native) == ["service (inbox -> done)"]
    assert nb.native_lines({"native": None}) == []


def test_a_recording_that_cannot_be_read_is_reported_not_raised():
    native = nb.native_budgets(FakeProfile(fail=True), _results(script=True), BENCH_PID)
    assert native == {"error": "perf script failed on perf.data: truncated file"}
    assert nb.native_lines({"native": native}) == [
        "", "where the CPU went: not available (perf script failed on perf.data: truncated "
        "file)"]


def test_without_perf_the_bench_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(nb.shutil, "which", lambda name: None)
    with pytest.raises(CxrError, match="needs Linux perf .*apt-get install linux-perf"):
        nb.check_perf()
    with pytest.raises(CxrError, match="needs Linux perf"):
        nb.NativeProfile(tmp_path / "perf.data")


FAKE_PERF = """\
import os, signal, sys, time
if os.environ.get("FAKE_PERF_DENY"):
    print("No permission to enable cpu-clock event.", file=sys.stderr)
    sys.exit(255)
out = sys.argv[sys.argv.index("-o") + 1]
open(out, "w").write("recording")
if "--" in sys.argv:
    sys.exit(0)  # a command to profile: done when it is
def stop(*_):
    open(out, "a").write(" stopped")
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def fake_perf(tmp_path, monkeypatch):
    """A `perf` first on PATH that records until SIGINT, or refuses like a non-root perf."""
    folder = tmp_path / "bin"
    folder.mkdir()
    perf = folder / "perf"
    perf.write_text(f"#!{sys.executable}\n{FAKE_PERF}")
    perf.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return perf


def test_a_perf_that_may_not_sample_every_cpu_is_refused_early(fake_perf, monkeypatch,
                                                                tmp_path):
    monkeypatch.setenv("FAKE_PERF_DENY", "1")
    with pytest.raises(CxrError, match="perf said: No permission to enable cpu-clock"):
        nb.check_perf()
    with pytest.raises(CxrError, match="perf said: No permission to enable cpu-clock"):
        nb.NativeProfile(tmp_path / "perf.data")


def test_the_recording_runs_until_stop_and_perf_writes_its_file(fake_perf, tmp_path):
    nb.check_perf()  # the fake allows it
    profile = nb.NativeProfile(tmp_path / "perf.data")
    assert profile._proc.poll() is None  # still recording
    profile.stop()
    assert profile._proc.returncode == 0
    assert (tmp_path / "perf.data").read_text() == "recording stopped"  # SIGINT, not a kill


def _perf_or_skip():
    try:
        nb.check_perf()
    except CxrError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_cxr_bench_perf_budgets_the_pipeline_and_the_script(tmp_path, monkeypatch, capsys):
    """A small real run under perf: both windows are budgeted, their samples add up to wall
    time x CPUs, and the roles are the stack's own processes."""
    from helpers_pipeline import shared_redis

    from worker.cli import main

    shared_redis(12)  # the bench's private queue lives on db 12 of the machine's Redis
    _perf_or_skip()
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
    for window in (service, script):
        expected = window["seconds"] * window["cpus"] * window["hz"]
        assert window["samples"] == pytest.approx(expected, rel=0.2), window
        assert sum(window["roles"].values()) == pytest.approx(
            window["samples"] * 1000.0 / window["hz"] / window["images"])
    assert service["images"] == 40 and script["images"] == 40
    assert {"worker pool process", "watcher"} <= set(service["roles"])
    assert service["roles"]["worker pool process"] > 0
    assert script["roles"]["the script (in the bench's process)"] > 0
    assert (tmp_path / "work" / "perf.data").stat().st_size > 0
