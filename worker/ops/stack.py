"""The whole service on this machine as one child process (``cxr up``), for the demo and the
bench: started in its own session with its output in a log file, stopped the way Ctrl-C
stops it, and killed with its whole process group if it hangs. The bench also runs one piece
of it (``cxr watch``) the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from worker.ops.supervisor import CXR_COMMAND

PROC = Path("/proc")


class LocalStack:
    """``cxr up [args]`` (or ``cxr COMMAND [args]``) running with ``env``; its output is
    appended to ``log_path``."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *args: str,
                 command: str = "up") -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [*CXR_COMMAND, command, *args], env=dict(env), stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system, every thread) the stack's live processes (the child and
        its descendants) have used so far, summed by ``cxr`` command (``up``, ``watch``,
        ``worker``: a worker's pool processes count as ``worker``); empty without ``/proc``."""
        return tree_cpu_seconds(self.proc.pid)

    def log_text(self) -> str:
        """Everything the child has written to its log so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, marker: str, timeout: float = 60.0) -> None:
        """Return once ``marker`` is in the log (the child says it is ready); raise if the
        child exits or ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while marker not in self.log_text():
            if not self.running() or time.monotonic() > deadline:
                raise RuntimeError(f"{marker!r} never appeared; see {self.log_path}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT (what Ctrl-C sends: the supervisor stops its children in order), then
        SIGKILL of the process group after ``timeout`` seconds."""
        if self.running():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds so far of ``root`` and its live descendants, each with the children it has
    reaped (a pool process that was replaced still counts), by role: a ``cxr`` command; a fork
    of a ``cxr`` process (a pool process, whatever title it set) takes its parent's; anything
    else its program name (``/proc/PID/comm``). Read from ``/proc``: no profiler, so the bench
    can count every run."""
    if not (PROC / "self" / "stat").exists():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float, str | None, str, str]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            exe = os.readlink(entry / "exe")
        except OSError:  # it exited meanwhile, or is not ours to read
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # the name in () may hold spaces
        n = len(CXR_COMMAND)
        command = argv[n] if argv[:n] == CXR_COMMAND and len(argv) > n else None
        cpu = sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
        procs[int(entry.name)] = (int(fields[1]), cpu, command, comm, exe)
    children: dict[int, list[int]] = {}
    for pid, (parent, *_) in procs.items():
        children.setdefault(parent, []).append(pid)
    used: dict[str, float] = {}
    todo: list[tuple[int, str | None, str]] = [(root, None, "")] if root in procs else []
    while todo:  # (pid, the cxr role its parent had, its parent's program)
        pid, inherited, parent_exe = todo.pop()
        _, cpu, command, comm, exe = procs[pid]
        cxr_role = command or (inherited if exe == parent_exe else None)
        used[cxr_role or comm] = used.get(cxr_role or comm, 0.0) + cpu
        todo += [(child, cxr_role, exe) for child in children.get(pid, [])]
    return used
