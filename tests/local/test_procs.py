"""The one process helper (pipeline.local.procs) of `make run`, the benchmark and the tests: start, wait for
/readyz, stop, what a failure says; and the demo's worker start. On small Python children standing in for a worker."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import ProcessNotReady
from pipeline.local import demo, procs
from pipeline.local.broker import free_port

# A stand-in worker: /readyz answers 503 with a reason until the file `ready` exists, then 200.
SERVER = """
import http.server, json, os, sys
ready = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = os.path.exists(ready)
        body = json.dumps({} if ok else {"not_ready": {"partitions": "recovering"}}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def server(tmp_path: Path, port: int) -> list[str]:
    return [sys.executable, "-c", SERVER, str(port), str(tmp_path / "ready")]


def test_a_child_is_waited_for_until_ready_and_stopped_with_sigterm(tmp_path: Path) -> None:
    # Given a child whose /readyz answers 503 at first
    port = free_port()
    log = tmp_path / "child.log"
    child = procs.start(server(tmp_path, port), {}, log)
    try:
        with pytest.raises(ProcessNotReady) as info:
            procs.wait_ready(child, f"http://127.0.0.1:{port}/readyz", timeout_s=1, name="w1", log_path=log,
                             poll_s=0.05)
        # Then not ready by the deadline says so, with the reasons /readyz gave and the log
        assert str(info.value) == "w1 not ready after 1s ({'not_ready': {'partitions': 'recovering'}}):\nserving\n"
        # When it becomes ready
        (tmp_path / "ready").touch()
        procs.wait_ready(child, f"http://127.0.0.1:{port}/readyz", timeout_s=10, name="w1", log_path=log,
                         poll_s=0.05)
        assert procs.probe(f"http://127.0.0.1:{port}/readyz") == (200, {})
    finally:
        # Then stop ends it with SIGTERM
        assert procs.stop(child, timeout_s=10) == -signal.SIGTERM


def test_a_child_that_exits_before_it_is_ready_fails_at_once_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = procs.start([sys.executable, "-c", "print('bad config: no such file'); raise SystemExit(2)"], {}, log)
    with pytest.raises(ProcessNotReady) as info:
        procs.wait_ready(child, f"http://127.0.0.1:{free_port()}/readyz", timeout_s=30, name="w1", log_path=log,
                         poll_s=0.05)
    assert str(info.value) == "w1 exited 2:\nbad config: no such file\n"


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout_with_what_it_started(tmp_path: Path) -> None:
    # Given a child that ignores SIGTERM and has started a grandchild (in its session)
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print(p.pid, flush=True); "
            "time.sleep(60)")
    log = tmp_path / "child.log"
    child = procs.start([sys.executable, "-c", code], {}, log)
    deadline = time.monotonic() + 10
    while not log.read_text().strip():
        assert time.monotonic() < deadline and child.poll() is None, log.read_text()
        time.sleep(0.02)
    grandchild = int(log.read_text().split()[0])
    # When it is stopped with a short timeout
    # Then it is SIGKILLed, and the grandchild with it (the whole session)
    assert procs.stop(child, timeout_s=0.5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while alive(grandchild):
        assert time.monotonic() < deadline, f"grandchild {grandchild} still running"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped by init."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_demo_starts_its_worker_and_returns_once_it_is_ready(tmp_path: Path) -> None:
    # Given a stand-in worker that is ready at once, and a log the demo appends to
    (tmp_path / "ready").touch()
    port = free_port()
    log = tmp_path / "worker.log"
    log.write_text("earlier run\n")
    # When `make run` starts it
    worker = demo.start_worker(server(tmp_path, port), {}, log, f"http://127.0.0.1:{port}/readyz", timeout_s=10)
    try:
        # Then it is running and ready, its output appended to the log
        assert worker.poll() is None and procs.probe(f"http://127.0.0.1:{port}/readyz") == (200, {})
        assert log.read_text() == "earlier run\nserving\n"
    finally:
        procs.stop(worker, timeout_s=10)


def test_the_demo_stops_with_the_workers_log_when_it_does_not_get_ready(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Given a stand-in worker that never gets ready
    port = free_port()
    log = tmp_path / "worker.log"
    # When `make run` starts it and its deadline passes
    with pytest.raises(SystemExit) as info:
        demo.start_worker(server(tmp_path, port), {}, log, f"http://127.0.0.1:{port}/readyz", timeout_s=1)
    # Then the demo ends saying so, after printing the reasons /readyz gave and the log, and the worker is stopped
    assert str(info.value) == "the worker did not start; see the log above"
    assert capsys.readouterr().out.endswith(
        "the worker not ready after 1s ({'not_ready': {'partitions': 'recovering'}}):\nserving\n\n")
    assert procs.probe(f"http://127.0.0.1:{port}/readyz") == (0, {})
