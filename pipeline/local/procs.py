"""Child processes of `make run`, the benchmark and the tests: start in their own session with a log file,
wait for GET /readyz with a deadline, stop with SIGTERM then SIGKILL, show the log when they fail."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ProcessNotReady

ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL = 5000  # characters of a failed process's log shown in the error


def pipeline_command(*args: str) -> list[str]:
    """`python -m pipeline <args>` with this interpreter."""
    return [sys.executable, "-m", "pipeline", *args]


def start(command: list[str], env: Mapping[str, str], log_path: Path, *, cwd: Path | None = None,
          append: bool = False) -> subprocess.Popen[bytes]:
    """Start `command` in a session of its own (so `stop` reaches whatever it starts), stdout and stderr to
    `log_path` (appended to with `append`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append else "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=dict(env), cwd=cwd or ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int | None:
    """SIGTERM its session, then SIGKILL if it has not exited within `timeout_s`; its exit code."""
    stop_all([proc], timeout_s)
    return proc.returncode


def stop_all(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """`stop` several at once: SIGTERM to every one first, so their shutdowns overlap."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(proc)


def kill(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int | None:
    """SIGKILL its session: a crash, no shutdown at all."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout_s)
    return proc.returncode


def probe(url: str, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET a JSON operations endpoint (/healthz, /readyz): (status, body), or (0, {}) while nothing answers."""
    # A child started here may serve HTTPS with a certificate made for the run: its readiness is what is asked.
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as r:  # noqa: S310 - a local child
            return r.status, _json(r.read())
    except urllib.error.HTTPError as e:
        return e.code, _json(e.read())
    except (OSError, ValueError):
        return 0, {}


def _json(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw or b"{}")
    return body if isinstance(body, dict) else {}


def log_tail(log_path: Path | None, chars: int = LOG_TAIL) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return log_path.read_text(errors="replace")[-chars:]


def wait_ready(proc: subprocess.Popen[bytes], url: str, *, timeout_s: float, name: str,
               log_path: Path | None = None, poll_s: float = 0.3) -> None:
    """Until GET `url` (a /readyz) answers 200. Raises ProcessNotReady, with the reasons /readyz last gave and
    the tail of the log, when the process exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while True:
        if proc.poll() is not None:
            raise ProcessNotReady(f"{name} exited {proc.returncode}:\n{log_tail(log_path)}")
        status, body = probe(url, timeout_s=min(5.0, max(0.5, deadline - time.monotonic())))
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise ProcessNotReady(f"{name} not ready after {timeout_s:.0f}s ({body}):\n{log_tail(log_path)}")
        time.sleep(poll_s)
