"""pipeline.settings: the one settings object reads the environment; a bad value stops start-up naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import Settings


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("PIPELINE_BATCH_CRON", "PIPELINE_WALK_PROCESSES", "PIPELINE_TRACEMALLOC",
                 "PIPELINE_TRACEMALLOC_INTERVAL_S", "PIPELINE_TRACEMALLOC_DUMP", "PIPELINE_API_KEY",
                 "PIPELINE_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_without_the_variables(clean: pytest.MonkeyPatch) -> None:
    s = Settings.from_env()
    assert (s.batch_cron, s.tracemalloc_frames, s.tracemalloc_interval_s, s.tracemalloc_dump_dir, s.api_key) == \
        ("0 2 * * *", 0, 60.0, None, "")
    assert 1 <= s.walk_processes <= 4
    assert s.log_format == "text"


def test_the_batch_walk_memory_and_client_variables_are_read(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given every variable set
    for name, value in {"PIPELINE_BATCH_CRON": "30 3 * * 1", "PIPELINE_WALK_PROCESSES": "0",
                        "PIPELINE_TRACEMALLOC": "8", "PIPELINE_TRACEMALLOC_INTERVAL_S": "5",
                        "PIPELINE_TRACEMALLOC_DUMP": str(tmp_path), "PIPELINE_API_KEY": " k1 "}.items():
        clean.setenv(name, value)
    # When the settings are read
    s = Settings.from_env()
    # Then each one is there, typed
    assert (s.batch_cron, s.walk_processes, s.tracemalloc_frames, s.tracemalloc_interval_s, s.tracemalloc_dump_dir,
            s.api_key) == ("30 3 * * 1", 0, 8, 5.0, tmp_path, "k1")


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("PIPELINE_BATCH_CRON", "every night", "PIPELINE_BATCH_CRON must be a crontab expression"),
    ("PIPELINE_WALK_PROCESSES", "-1", "PIPELINE_WALK_PROCESSES must be a whole number"),
    ("PIPELINE_TRACEMALLOC", "lots", "PIPELINE_TRACEMALLOC must be on/off or a number of frames"),
    ("PIPELINE_TRACEMALLOC_INTERVAL_S", "0", "PIPELINE_TRACEMALLOC_INTERVAL_S must be a positive float"),
    ("PIPELINE_LOG_FORMAT", "xml", "PIPELINE_LOG_FORMAT must be one of text, json, not 'xml'"),
])
def test_a_bad_value_names_the_variable(clean: pytest.MonkeyPatch, name: str, value: str, problem: str) -> None:
    clean.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env()
    assert problem in str(info.value)
