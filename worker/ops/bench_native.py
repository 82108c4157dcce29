"""``cxr bench --perf``: where each image's CPU went, by process and native library (issue 28).

A sampling profiler of Python (py-spy) counts a thread waiting for a core where it waits, so
its per-step sums drift between runs. Linux ``perf`` on the ``cpu-clock`` timer samples every
CPU whatever runs on it, idle included (a hardware ``cycles`` event would skip halted CPUs), so
the samples of a window add up to its wall-clock time times the CPUs: a budget whose rows sum
to what was spent. The bench records the whole machine while it runs, then splits two windows
by the wall-clock times it kept (``pipeline.window_unix``, ``script.windows_unix``): the
service's (drop to the last row done) and the user's script's fastest pass, the one
``service / script`` uses. Rows are process roles, by the pids the run recorded (watcher,
worker pool process, Celery parent, ``cxr up``, the bench's own process, other processes,
idle) and, inside each, the
library the sampled code lives in (libjpeg-turbo, Pillow, OpenSSL's SHA-256, the interpreter,
the kernel, TensorFlow, numpy, libc, SQLite).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.exceptions import CxrError
from worker.ops.bench_script import fastest_pass
from worker.ops.supervisor import die_with_parent

HZ = 499
"""Samples per second per CPU (a prime, so sampling does not beat with 10 ms timers)."""
LIBRARIES: list[tuple[str, str]] = [
    # (name, regex on "dso symbol"); the first that matches names the sample
    ("JPEG decoding (libjpeg-turbo)", r"libjpeg|jpeg_|decode_mcu|jsimd_|simplejpeg/_jpeg"),
    ("resize and grey (Pillow)", r"_imaging\."),
    ("resize (TensorFlow)", r"tensorflow\S*\s.*[Rr]esize"),
    ("SHA-256 (OpenSSL)", r"libcrypto"),
    ("Python interpreter", r"libpython|/bin/python3"),
    ("kernel (syscalls, page faults, scheduling)", r"kernel\.kallsyms|\[kernel|vmlinux"),
    ("TensorFlow (forward pass, tf.data)", r"tensorflow|_pywrap|libtf"),
    ("numpy", r"_multiarray|_umath|numpy"),
    ("libc (memcpy, malloc)", r"libc\.so|ld-linux|libstdc\+\+|libm\.so"),
    ("SQLite", r"sqlite"),
]
OTHER = "other"
BENCH = "the bench's own process"
"""Outside the script's passes the bench only polls the database."""
_LINE = re.compile(r"^\s*(\S.*?)\s+(\d+)\s+([\d.]+):\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
RECORD = ["perf", "record", "-a", "-e", "cpu-clock"]
"""Every CPU on the timer event: it samples idle CPUs too, and takes wall-clock stamps."""
NO_PERF = ("cxr bench --perf needs Linux perf (Debian: apt-get install linux-perf) and the "
           "right to sample every CPU (root, or sysctl kernel.perf_event_paranoid=-1)")


@dataclass(frozen=True)
class Sample:
    comm: str
    pid: int
    time: float
    symbol: str
    dso: str


def library_of(dso: str, symbol: str) -> str:
    """The library group a sample's code belongs to (``LIBRARIES``), else ``other``."""
    text = f"{dso} {symbol}"
    for name, pattern in LIBRARIES:
        if re.search(pattern, text):
            return name
    return OTHER


def parse_samples(lines: Iterable[str]) -> list[Sample]:
    """``perf script -F comm,pid,time,ip,sym,dso`` lines as samples (other lines skipped)."""
    samples = []
    for line in lines:
        if m := _LINE.match(line):
            samples.append(Sample(m.group(1), int(m.group(2)), float(m.group(3)), m.group(4),
                                  m.group(5)))
    return samples


def started_processes(stack_log: str) -> dict[str, int]:
    """role -> pid of the processes ``cxr up`` says it started (in this part of its log)."""
    return {role: int(pid)
            for role, pid in re.findall(r"cxr up: started (\w+) \(pid (\d+)\)", stack_log)}


def _roles(processes: dict[str, int], bench_pid: int) -> dict[int, str]:
    """pid -> the role a budget names it by."""
    names = {"worker": "Celery parent", "supervisor": "cxr up (supervisor)"}
    return {**{pid: names.get(role, role) for role, pid in processes.items()},
            bench_pid: BENCH}


def budget(samples: list[Sample], window: tuple[float, float], known: dict[int, str],
           images: int, main_pid: int | None = None, main_role: str = "worker pool process",
           hz: int = HZ) -> dict[str, Any]:
    """CPU milliseconds per image in ``window``, by role and by (role, library). Idle is pid 0,
    ``known`` names pids; ``main_pid`` is ``main_role`` (by default the busiest process not in
    ``known``: the pool process, which no log names); everything else is other processes."""
    inside = [s for s in samples if window[0] <= s.time <= window[1]]
    if main_pid is None:
        busy = Counter(s.pid for s in inside if s.pid != 0 and s.pid not in known)
        main_pid = busy.most_common(1)[0][0] if busy else None
    names = {**known, 0: "idle", **({main_pid: main_role} if main_pid is not None else {})}
    per_sample = 1000.0 / hz / images
    roles, libraries = Counter(), Counter()
    for s in inside:
        role = names.get(s.pid, "other processes")
        roles[role] += 1
        if s.pid != 0:
            libraries[(role, library_of(s.dso, s.symbol))] += 1
    return {"seconds": window[1] - window[0], "samples": len(inside), "images": images,
            "hz": hz, "cpus": os.cpu_count() or 1,
            "roles": {r: n * per_sample for r, n in roles.most_common()},
            "libraries": {f"{r} / {lib}": n * per_sample
                          for (r, lib), n in libraries.most_common()}}


def render(name: str, result: dict[str, Any], floor_ms: float = 0.02) -> list[str]:
    """One window's budget as a table: each role, then its libraries of ``floor_ms`` or more.
    ``perf -a`` samples every online CPU, not only those this process may use."""
    cores = result["cpus"]
    expected = result["seconds"] * cores * result["hz"]
    total = sum(result["roles"].values())
    lines = [f"{name}: {result['images']} images in {result['seconds']:.2f} s, "
             f"{result['samples']} samples of {expected:.0f} expected ({cores} CPUs x "
             f"{result['hz']} Hz)", f"  {'ms of CPU per image':<52}{'ms':>7}{'share':>7}"]
    for role, ms in result["roles"].items():
        lines.append(f"  {role:<52}{ms:>7.2f}{ms / total:>7.0%}")
        lines += [f"    {key.split(' / ', 1)[1]:<50}{lib_ms:>7.2f}"
                  for key, lib_ms in result["libraries"].items()
                  if key.startswith(f"{role} / ") and lib_ms >= floor_ms]
    lines.append(f"  {'all (samples / Hz / images)':<52}{total:>7.2f}")
    return lines


def check_perf() -> None:
    """Fail before the run, not after it, when perf is missing or may not sample every CPU."""
    if shutil.which("perf") is None:
        raise CxrError(NO_PERF)
    with tempfile.TemporaryDirectory(prefix="cxr-perf-") as folder:
        tried = subprocess.run([*RECORD, "-q", "-B", "-o", f"{folder}/probe.data", "--", "true"],
                               capture_output=True, text=True)
    if tried.returncode != 0:
        said = " / ".join((tried.stderr or tried.stdout).strip().splitlines()[-3:])
        raise CxrError(f"{NO_PERF}; perf said: {said}")


class NativeProfile:
    """A whole-machine ``perf record`` (``cpu-clock``, wall-clock timestamps) that runs from
    construction to ``stop``; it dies with this process if the bench is killed."""

    def __init__(self, path: Path, hz: int = HZ) -> None:
        if shutil.which("perf") is None:
            raise CxrError(NO_PERF)
        self.path, self.hz = Path(path), hz
        self._log = open(self.path.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        try:
            self._proc = subprocess.Popen(
                [*RECORD, "-k", "realtime", "-F", str(hz), "--no-buildid", "-o",
                 str(self.path)],
                stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        except OSError:
            self._log.close()
            raise
        time.sleep(1.0)  # perf exits at once when it may not sample every CPU
        if self._proc.poll() is not None:
            self._log.close()
            said = self.path.with_suffix(".log").read_text().strip().splitlines()[-3:]
            raise CxrError(f"{NO_PERF}; perf said: {' / '.join(said)}")

    def stop(self) -> None:
        """Stop recording (SIGINT: perf writes its file and exits)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def samples(self, window: tuple[float, float]) -> list[Sample]:
        """The samples recorded between two wall-clock times."""
        out = subprocess.run(
            ["perf", "script", "-i", str(self.path), "--time",
             f"{window[0]:.6f},{window[1]:.6f}", "-F", "comm,pid,time,ip,sym,dso"],
            capture_output=True, text=True, check=True).stdout
        return parse_samples(out.splitlines())


def native_budgets(profile, results: dict[str, Any], bench_pid: int) -> dict[str, Any]:
    """The service's window and the script's fastest pass (when it ran), budgeted; any
    failure to read the recording is reported in the result, never loses the run."""
    pipeline = results["pipeline"]
    known = _roles(pipeline.get("processes", {}), bench_pid)
    windows = {"service (inbox -> done)": (tuple(pipeline["window_unix"]), pipeline["images"],
                                          None, "worker pool process")}
    script = results.get("script")
    if script and script.get("windows_unix"):
        fastest = fastest_pass(script)
        windows["the user's script, its fastest pass"] = (
            tuple(script["windows_unix"][fastest]), script["images"], bench_pid,
            "the script (in the bench's process)")
    try:
        return {name: budget(profile.samples(window), window, known, images, main, role,
                             profile.hz)
                for name, (window, images, main, role) in windows.items()}
    except (OSError, subprocess.CalledProcessError) as exc:
        said = getattr(exc, "stderr", None) or str(exc)
        return {"error": f"perf script failed on {profile.path}: {said.strip()[-300:]}"}


def native_lines(result: dict[str, Any]) -> list[str]:
    """The report's native budget tables (none without ``--perf``)."""
    native = result.get("native")
    if not native:
        return []
    if "error" in native:
        return ["", f"where the CPU went: not available ({native['error']})"]
    lines = ["", "where the CPU went (perf, whole machine):"]
    for name, window in native.items():
        lines += render(name, window)
    return lines
