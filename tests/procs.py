"""`pipeline ...` subprocesses for tests: started in their own session, stopped (SIGTERM, then SIGKILL) by the
fixture that owns them, their logs printed when the test failed."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import ProcessNotReady
from pipeline.local import procs as children
from pipeline.settings import load_topics

ROOT = Path(__file__).resolve().parents[1]


class PipelineProc:
    """One `python -m pipeline <args>` process (or `command <args>`, from `cwd`), its output in `log_path`."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, *,
                 command: list[str] | None = None, cwd: Path | None = None) -> None:
        self.log_path = log_path
        self.env = env
        self.proc = children.start([*(command or [sys.executable, "-m", "pipeline"]), *args], env, log_path,
                                   cwd=cwd or ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30) -> int:
        children.stop(self.proc, timeout_s)
        return self.proc.returncode

    def kill(self, timeout_s: float = 10) -> int:
        """SIGKILL the process and everything it started (its session): a crash, no shutdown at all."""
        children.kill(self.proc, timeout_s)
        return self.proc.returncode


class WorkerProc(PipelineProc):
    """A `pipeline worker` process with its HTTP API port. Its API is open (PIPELINE_API_AUTH=off, said
    explicitly: a worker without API keys refuses to start otherwise) unless `env` gives it a keys file or
    says otherwise: tests/api/ test the authentication; the others read profiles without keys."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path, web_port: int, *,
                 command: list[str] | None = None, cwd: Path | None = None) -> None:
        if "PIPELINE_API_KEYS_FILE" not in env and "PIPELINE_API_AUTH" not in env:
            env = {**env, "PIPELINE_API_AUTH": "off"}
        super().__init__(["worker", "--loglevel", "info"], env, log_path, command=command, cwd=cwd)
        self.name = name
        self.web_port = web_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def probe_url(self) -> str:
        """Where its operations endpoints answer: the address it binds (PIPELINE_WEB_HOST), HTTPS with TLS."""
        host = self.env.get("PIPELINE_WEB_HOST", "").strip() or "127.0.0.1"
        scheme = "https" if self.env.get("PIPELINE_WEB_TLS_CERT") else "http"
        return f"{scheme}://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.web_port}"

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """GET /readyz: (status, body), or (0, {}) while nothing answers."""
        return probe(f"{self.probe_url}/readyz")

    def wait_ready(self, timeout_s: float = 90) -> None:
        """Until GET /readyz answers 200: partitions assigned, tables recovered, ingest consuming."""
        try:
            children.wait_ready(self.proc, f"{self.probe_url}/readyz", timeout_s=timeout_s, name=f"worker {self.name}",
                                log_path=self.log_path)
        except ProcessNotReady as exc:
            raise AssertionError(str(exc)) from None

    def assignment(self) -> tuple[int, dict[str, list[int]]] | None:
        """(generation, stage partitions) of the group assignment it has recovered, while /readyz answers 200."""
        status, body = self.readyz()
        return (body["generation"], body["partitions"]) if status == 200 and "generation" in body else None


STAGE_TOPICS = ("internal.identity", "internal.profile-ops")  # Faust's group: what /readyz's partitions list


def wait_settled(workers: Iterable[WorkerProc], timeout_s: float = 60) -> int:
    """Until every one of `workers` (the whole group) is ready on the same generation of Faust's group and
    between them they hold each stage partition once: the latest rebalance has reached every worker and its
    tables are recovered ("ready" alone is also true of a worker the rebalance has not reached yet). Returns
    the generation."""
    workers = list(workers)
    registry = load_topics(workers[0].env.get("PIPELINE_TOPIC_PREFIX", ""))
    every = {t: list(range(registry[t].partitions)) for t in STAGE_TOPICS}
    deadline = time.monotonic() + timeout_s
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for w in workers:
            if w.proc.poll() is not None:
                raise AssertionError(f"worker {w.name} exited {w.proc.returncode}:\n{w.log()[-5000:]}")
        seen = {w.name: w.assignment() for w in workers}
        states = list(seen.values())
        if all(states) and len({s[0] for s in states if s}) == 1:
            held = {t: sorted(p for s in states if s for p in s[1].get(t, [])) for t in STAGE_TOPICS}
            if held == every:
                return next(s[0] for s in states if s)
        time.sleep(0.3)
    raise AssertionError(f"workers not settled on one assignment after {timeout_s}s: {seen}\n"
                         + "\n".join(f"--- {w.name}:\n{w.log()[-3000:]}" for w in workers))


def probe(url: str, timeout_s: float = 5) -> tuple[int, dict[str, Any]]:
    """GET a JSON operations endpoint (/healthz, /readyz): (status, body), or (0, {}) while nothing answers."""
    return children.probe(url, timeout_s)


def stop_all(procs: Iterable[PipelineProc], request: Any, tail: int = 8000) -> None:
    """Fixture teardown: stop every process, then print their logs if the test failed."""
    procs = list(procs)
    children.stop_all([p.proc for p in procs])  # SIGTERM to all first: their shutdowns overlap
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in procs:
            print(f"\n===== log of {p.log_path.name} (last {tail} chars) =====\n{p.log()[-tail:]}")
