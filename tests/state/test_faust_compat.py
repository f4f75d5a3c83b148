"""A revoked table partition's RocksDB store is closed at once (faust-streaming leaves it to garbage
collection), so this process can open it again when the partition comes back (issue 13, defect 3); the
worker's tables start without Faust's 1 s grace."""

from __future__ import annotations

import ast
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.types import TP
from rocksdict import Options, Rdict

from pipeline.app import build_app
from pipeline.settings import Settings
from pipeline.state import faust_compat
from pipeline.state.faust_compat import close_revoked_partitions
from pipeline.state.tables import ChangelogRouter, PartitionedTable


def routed_table(tmp_path: Path) -> tuple[faust.App, PartitionedTable]:
    """A real faust RocksDB table (no broker needed), its changelog sent nowhere, with the patch installed."""
    app = faust.App("compat-test", broker="kafka://127.0.0.1:1", store="rocksdb://", datadir=str(tmp_path))
    table = app.Table("t", partitions=4, key_type=bytes, value_type=bytes)
    ChangelogRouter(lambda *_a, **_k: None).route(table)
    view = PartitionedTable(table, 4)
    close_revoked_partitions(table, view.release)
    return app, view


async def test_a_revoked_partition_is_closed_and_reopens_with_its_data(tmp_path: Path) -> None:
    # Given a partition written through the partitioned view (which keeps its handle, to skip the WAL)
    _, view = routed_table(tmp_path)
    table = view.table
    view.put(1, b"k", b"v")
    view.put(2, b"other", b"x")
    tp = TP(table.changelog_topic.get_topic_name(), 1)
    # When Faust revokes it in a rebalance
    await table.data.on_rebalance(assigned={TP(tp.topic, 2)}, revoked={tp}, newly_assigned=set())
    # Then its database is closed: this process can open it again, and the unlogged write was flushed
    assert 1 not in table.data._dbs and 2 in table.data._dbs
    db = Rdict(str(table.data.partition_path(1)), Options(raw_mode=True))
    try:
        assert db.get(b"k") == b"v"
    finally:
        db.close()
    # And the view reads and writes it again through a fresh handle, still without the WAL
    assert view.get(1, b"k") == b"v"
    view.put(1, b"k2", b"v2")
    assert view._unlogged[1] is table.data._dbs[1]
    assert view.get(2, b"other") == b"x"  # the partition kept is untouched


def test_another_faust_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faust, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="0.99.0"):
        faust_compat.require_faust_version()


def _private_attributes(tree: ast.AST) -> set[str]:
    """`obj._name` accesses on anything but `self` / `cls` (a module's own privates are its business)."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))}


def test_only_faust_compat_touches_faust_private_attributes() -> None:
    # Given the private attributes faust_compat reaches into (Faust's stores, assignor, web driver)
    package = Path(faust_compat.__file__).parents[1]
    faust_private = _private_attributes(ast.parse(Path(faust_compat.__file__).read_text()))
    assert {"_db_for_partition", "_dbs", "_key_index", "_assignment"} <= faust_private
    # When every other module of the package is read
    offenders = {
        str(path.relative_to(package)): sorted(found)
        for path in package.rglob("*.py") if path.name != "faust_compat.py"
        if (found := _private_attributes(ast.parse(path.read_text())) & faust_private)}
    # Then none of them touches one
    assert offenders == {}


async def test_the_worker_starts_its_tables_without_faust_s_grace_second(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the worker's app (its tables declared by build_app), with the table manager's start-up steps
    # recorded instead of run
    for name, value in {"KAFKA_BOOTSTRAP": "127.0.0.1:1", "PIPELINE_DATA_DIR": str(tmp_path / "data"),
                        "PIPELINE_API_AUTH": "off"}.items():
        monkeypatch.setenv(name, value)
    manager = build_app(Settings.from_env()).app.tables
    steps: list[str] = []

    def record(step: str) -> Callable[..., Coroutine[Any, Any, None]]:
        async def run(*args: Any) -> None:
            steps.append(f"{step}{args}" if args else step)
        return run

    monkeypatch.setattr(manager, "sleep", record("sleep"))
    monkeypatch.setattr(manager, "_update_channels", record("finalise tables"))
    monkeypatch.setattr(manager.recovery, "start", record("start recovery"))
    # When it starts
    await manager.on_start()
    # Then it finalises the tables and starts recovery at once (Faust's own manager sleeps 1 s first, and
    # the worker subscribes, so becomes ready, only after that)
    assert steps == ["finalise tables", "start recovery"]
    assert sorted(manager) == ["identity", "profiles"]
