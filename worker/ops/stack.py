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
    """CPU seconds so far of ``root`` and its live descendants, by ``cxr`` command, else by
    program name. Read from ``/proc``: no profiler, so the bench can count every run."""
    if not (PROC / "self" / "stat").exists():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float, str]] = {}  # pid -> (parent, CPU seconds, role)
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the name in () may hold spaces
        n = len(CXR_COMMAND)
        role = argv[n] if argv[:n] == CXR_COMMAND and len(argv) > n else Path(argv[0]).name
        procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick,
                                  role)
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    used: dict[str, float] = {}
    todo = [root] if root in procs else []
    while todo:
        pid = todo.pop()
        _, cpu, role = procs[pid]
        used[role] = used.get(role, 0.0) + cpu
        todo += children.get(pid, [])
    return used
