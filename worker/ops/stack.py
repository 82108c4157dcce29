"""The whole service on this machine as one child process (``cxr up``), for the demo and the
bench: started in its own session with its output in a log file, stopped the way Ctrl-C
stops it, and killed with its whole process group if it hangs."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from worker.ops.supervisor import CXR_COMMAND


class LocalStack:
    """``cxr up [up_args]`` running with ``env``; its output is appended to ``log_path``."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *up_args: str) -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [*CXR_COMMAND, "up", *up_args], env=dict(env), stdout=self._log,
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
