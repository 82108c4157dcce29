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
