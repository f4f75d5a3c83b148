"""The package runs outside its source tree: shipped files, the data directory default, `pipeline init`, and
a built wheel installed in a fresh venv (`--help`, `init`, `topics apply --dry-run`, a worker start)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import ROOT, WorkerProc

from pipeline.local.broker import SINGLE_BROKER_ENV, free_port
from pipeline.resources import EXAMPLE_CONFIG_DIR, SCHEMAS_DIR, TOPICS_FILE
from pipeline.settings import PipelineConfig, Settings, load_topics
from pipeline.topics import apply

# What a wheel is built from; copied out of the checkout so the build leaves no build/ or egg-info in it.
BUILD_INPUTS = ("pyproject.toml", "pipeline", "schemas", "topics.yaml", "config")
UNREACHABLE = "127.0.0.1:1"


def test_shipped_files_are_the_top_level_ones() -> None:
    # In a checkout, the package's files resolve to the one copy at the top level (through pipeline/_data/)
    assert TOPICS_FILE == ROOT / "topics.yaml"
    assert SCHEMAS_DIR == ROOT / "schemas" and sorted(SCHEMAS_DIR.glob("*.avsc"))
    assert EXAMPLE_CONFIG_DIR == ROOT / "config" / "example"


def test_data_dir_defaults_to_a_per_user_folder_per_app_id(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.delenv("PIPELINE_DATA_DIR", raising=False)
    monkeypatch.setenv("PIPELINE_APP_ID", "shop-eu")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert Settings.from_env().data_dir == tmp_path / "home" / ".local" / "share" / "cdp-pipeline" / "shop-eu"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert Settings.from_env().data_dir == tmp_path / "xdg" / "cdp-pipeline" / "shop-eu"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # the XDG spec says to ignore a relative path
    assert Settings.from_env().data_dir == tmp_path / "home" / ".local" / "share" / "cdp-pipeline" / "shop-eu"
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path / "mine"))
    assert Settings.from_env().data_dir == tmp_path / "mine"


def run_pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "KAFKA_BOOTSTRAP": UNREACHABLE})


def test_init_writes_the_example_configuration_and_refuses_to_overwrite(tmp_path: Path) -> None:
    # Given an empty folder, When `pipeline init` writes into it
    out = run_pipeline("init", "cfg", cwd=tmp_path)
    cfg = tmp_path / "cfg"
    # Then it holds a copy of every example file, which loads, and the next steps name the folder
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in EXAMPLE_CONFIG_DIR.glob("*.yaml"))
    assert sorted(p.name for p in cfg.iterdir()) == names
    assert all(filecmp.cmp(EXAMPLE_CONFIG_DIR / n, cfg / n, shallow=False) for n in names)
    assert PipelineConfig.load(cfg).audiences
    assert f"PIPELINE_CONFIG={cfg}" in out.stdout and "pipeline topics apply --dry-run" in out.stdout
    # When run again over an edited file, Then it refuses, names the files and changes nothing
    (cfg / "segments.yaml").write_text("audiences: []\n")
    again = run_pipeline("init", "cfg", cwd=tmp_path)
    assert again.returncode == 1 and "segments.yaml" in again.stderr and "--force" in again.stderr
    assert (cfg / "segments.yaml").read_text() == "audiences: []\n"
    # And --force replaces them
    forced = run_pipeline("init", "cfg", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and filecmp.cmp(EXAMPLE_CONFIG_DIR / "segments.yaml", cfg / "segments.yaml",
                                                  shallow=False)


def test_dry_run_without_a_reachable_broker_says_so_within_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    out = run_pipeline("topics", "apply", "--dry-run", cwd=tmp_path)
    took = time.monotonic() - started
    assert out.returncode == 1 and out.stdout == ""
    assert f"error: the Kafka cluster at {UNREACHABLE} (PLAINTEXT) is not reachable" in out.stderr
    assert took < 25  # a 5 s wait for the cluster, plus the interpreter's start on a loaded machine


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what points back at the checkout (PYTHONPATH: pip would take the checkout's
    egg-info for an installed cdp-pipeline) or at another test's topics and folders; one replica per topic
    on the one test broker."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "PYTHON", "XDG_"))}
    return {**base, **SINGLE_BROKER_ENV, **extra}


@dataclass(frozen=True)
class Installed:
    """The wheel installed in a fresh venv, and a folder outside the source tree to run it from."""

    venv: Path
    home: Path  # the working directory and $HOME of every command

    @property
    def pipeline(self) -> Path:
        return self.venv / "bin" / "pipeline"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(**{"HOME": str(self.home), "KAFKA_BOOTSTRAP": UNREACHABLE, **extra})

    def run(self, *argv: str | Path, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in argv], cwd=self.home, env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from the checkout's files and install it in a new venv. The venv reuses the running
    interpreter's installed dependencies through a .pth line (a path line adds that folder alone: its own .pth
    files, such as an editable install's finder, are not run), so only the wheel itself is new."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = clean_env()
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)], check=True, timeout=300,
                   env=env)
    (wheel,) = (tmp / "dist").glob("cdp_pipeline-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120,
                   env=env)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True,
                   timeout=300, env=env)
    # after the install: pip would take the editable install it sees there for this very version
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_cdp_test_dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    home = tmp / "home"
    home.mkdir()
    return Installed(venv, home)


def test_the_installed_wheel_runs_outside_the_source_tree(installed: Installed) -> None:
    # Given the wheel installed in a fresh venv, When the package is imported there, Then every module of it
    # (and its shipped files) come from that venv, none from the checkout
    probe = ("import json, sys, pipeline.app, pipeline.cli, pipeline.resources as r; "
             "print(json.dumps({'path': sys.path, 'modules': [m.__file__ for m in list(sys.modules.values()) "
             "if getattr(m, '__file__', None)], 'files': [str(r.TOPICS_FILE), str(r.SCHEMAS_DIR), "
             "str(r.EXAMPLE_CONFIG_DIR)]}))")
    out = installed.run(installed.venv / "bin" / "python", "-c", probe)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert str(ROOT) not in found["path"]  # ("" is there for `-c`: the working directory, outside it)
    ours = [f for f in found["modules"] if "/pipeline/" in f]
    assert ours and all(f.startswith(str(installed.venv)) for f in ours), ours
    # (the reused dependencies may live in the checkout, in its .venv: its own code must not)
    assert not [f for f in found["modules"] if f.startswith(str(ROOT / "pipeline") + "/")]
    assert all(f.startswith(str(installed.venv)) and Path(f).exists() for f in found["files"])
    # And the command works: --help lists the commands, init writes a configuration the worker accepts
    help_out = installed.run(installed.pipeline, "--help")
    assert help_out.returncode == 0 and "init" in help_out.stdout and "worker" in help_out.stdout
    init = installed.run(installed.pipeline, "init", "./cfg")
    assert init.returncode == 0, init.stderr
    assert sorted(p.name for p in (installed.home / "cfg").iterdir()) == [
        "datasets.yaml", "destinations.yaml", "identity.yaml", "segments.yaml"]
    # And a dry run with no broker to compare with says so, non-zero
    dry = installed.run(installed.pipeline, "topics", "apply", "--dry-run")
    assert dry.returncode == 1
    assert f"the Kafka cluster at {UNREACHABLE} (PLAINTEXT) is not reachable" in dry.stderr


@pytest.mark.integration
def test_the_installed_wheel_plans_topics_and_starts_a_worker(installed: Installed, kafka_bootstrap: str,
                                                               tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    env = {"KAFKA_BOOTSTRAP": kafka_bootstrap, "PIPELINE_TOPIC_PREFIX": prefix}
    if not (installed.home / "cfg").exists():
        assert installed.run(installed.pipeline, "init", "./cfg").returncode == 0
    reg = load_topics(prefix)
    # When the installed command plans the topics against the broker
    dry = installed.run(installed.pipeline, "topics", "apply", "--dry-run", **env)
    # Then it prints a creation for every declared topic and creates none
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[:2] for line in dry.stdout.splitlines()[:-1]] == [["create", s.name] for s in reg]
    assert dry.stdout.splitlines()[-1].endswith(f"{len(list(reg))} change(s) planned, nothing applied")
    assert {i.action for i in apply(reg, kafka_bootstrap, dry_run=True, out=lambda *_: None)} == {"create"}
    # When it applies them and starts a worker on the configuration `init` wrote, with the default data dir
    assert installed.run(installed.pipeline, "topics", "apply", **env).returncode == 0
    app_id = f"cdp-{prefix.rstrip('-')}"
    port = free_port()
    worker = WorkerProc("installed", installed.env(**env, PIPELINE_APP_ID=app_id, PIPELINE_CONFIG="./cfg",
                                                   PIPELINE_WEB_PORT=str(port),
                                                   XDG_DATA_HOME=str(installed.home / "xdg")),
                        tmp_path / "worker.log", port, command=[str(installed.pipeline)], cwd=installed.home)
    try:
        # Then it gets ready, keeping its state in the per-user folder for its app id
        worker.wait_ready()  # its log's tail is in the failure if not
        assert (installed.home / "xdg" / "cdp-pipeline" / app_id / "worker-1").is_dir()
    finally:
        worker.stop()

