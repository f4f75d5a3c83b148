"""`pipeline ...` subprocesses for tests: started in their own session, stopped (SIGTERM, then SIGKILL) by the
fixture that owns them, their logs printed when the test failed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class PipelineProc:
    """One `python -m pipeline <args>` process, its output in `log_path`."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, cwd=ROOT,
                                     stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self, timeout_s: float = 10) -> int:
        """SIGKILL the process and everything it started (its session): a crash, no shutdown at all."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout_s)
        return self.proc.returncode


def stop_all(procs: Iterable[PipelineProc], request: Any, tail: int = 8000) -> None:
    """Fixture teardown: stop every process, then print their logs if the test failed."""
    procs = list(procs)
    for p in procs:
        p.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in procs:
            print(f"\n===== log of {p.log_path.name} (last {tail} chars) =====\n{p.log()[-tail:]}")
