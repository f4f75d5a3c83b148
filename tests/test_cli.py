"""The `pipeline` command: bad configuration stops start-up with the file, the line and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.settings import DEFAULT_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "KAFKA_BOOTSTRAP": "127.0.0.1:1", **(env_extra or {})})


def config_with(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "cfg"
    d.mkdir()
    for f in ("identity.yaml", "datasets.yaml", "segments.yaml"):
        (d / f).write_text((DEFAULT_CONFIG / f).read_text())
    (d / name).write_text(text)
    return d


def test_worker_refuses_a_segment_syntax_error_with_its_location(tmp_path):
    # Given a segments file whose second audience has a syntax error on line 5
    d = config_with(tmp_path, "segments.yaml", "audiences:\n  - {id: a, name: a, description: d, query: 'x = 1'}\n"
                    "  - id: b\n    name: b\n    query: 'loyalty.tier = = \"gold\"'\n    description: d\n")
    # When the worker starts
    out = run("--config", str(d), "worker")
    # Then it stops before connecting anywhere, naming file, line and what was expected
    assert out.returncode == 2
    assert f"{d / 'segments.yaml'}:5:" in out.stderr and "expected" in out.stderr.lower()


def test_worker_refuses_an_unknown_normaliser(tmp_path):
    d = config_with(tmp_path, "identity.yaml", "max_identities_per_graph: 50\nnamespaces:\n"
                    "  - {name: ECID, kind: cookie, priority: 10, unique: false, normaliser: trim}\n"
                    "  - {name: Email, kind: person, priority: 60, unique: false, normaliser: emial}\n")
    out = run("--config", str(d), "worker")
    assert out.returncode == 2
    assert f"{d / 'identity.yaml'}:4" in out.stderr and "emial" in out.stderr and "email" in out.stderr


def test_segments_explain_says_why(tmp_path):
    out = run("segments", "explain", "shoe-lovers")
    assert out.returncode == 0
    assert out.stdout.startswith("shoe-lovers: streaming, batch - ")
    out = run("segments", "explain", "nope")
    assert out.returncode == 2 and "unknown audience 'nope'" in out.stderr
