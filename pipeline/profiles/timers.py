"""The profile agent's timers: the deadline timer (which also sends each newly assigned partition its
definitions check), the hot reload of audience definitions and consent rules, the acknowledgement records of an
idle worker, the walk processes' idle stop, and the daily batch run (cron)."""

from __future__ import annotations

import logging

from pipeline.consent import ConsentAttributes
from pipeline.errors import ConfigError
from pipeline.profiles.deadlines import Deadlines
from pipeline.profiles.outbox import Stamps
from pipeline.profiles.walks import Walks
from pipeline.runtime import Runtime
from pipeline.segments import SegmentEngine, load_segments
from pipeline.segments.batch import batch_request, new_run_id
from pipeline.stages.messages import DefsCheck, Send, Tick
from pipeline.topics import PROFILE_TOPIC

log = logging.getLogger(__name__)


def register(rt: Runtime, walks: Walks, deadlines: Deadlines, stamps: Stamps) -> None:
    """Register the timers on the app; reads destinations.yaml's consent rules once first (a broken file stops
    the start, naming file and line)."""
    if walks.pool is not None:
        @rt.app.timer(10.0)
        async def stop_idle_walk_processes() -> None:
            if walks.pool is not None:
                walks.pool.close_if_idle()

    @rt.app.crontab(rt.settings.batch_cron, on_leader=True)
    async def scheduled_batch() -> None:
        """The daily batch run (PIPELINE_BATCH_CRON, UTC): every audience over every profile."""
        run = new_run_id("scheduled")
        log.info("scheduled batch run %s: requesting every partition", run)
        for part in range(rt.registry[PROFILE_TOPIC].partitions):
            rt.send(Send(PROFILE_TOPIC, run, batch_request(run, [], 0)), partition=part)

    checked: set[int] = set()
    segments_file = rt.settings.config_dir / "segments.yaml"
    seen_mtime = [segments_file.stat().st_mtime if segments_file.exists() else 0.0]

    @rt.app.timer(2.0)
    async def reload_definitions() -> None:
        """Audience definitions edited while running: load, swap the engine, re-check every partition.
        A file that does not load is logged (file, line, problem) and the current definitions stay."""
        try:
            mtime = segments_file.stat().st_mtime
        except OSError:
            return
        if mtime == seen_mtime[0]:
            return
        seen_mtime[0] = mtime
        try:
            audiences = load_segments(segments_file)
        except ConfigError as exc:
            log.error("segments not reloaded, keeping the current definitions: %s", exc)
            return
        rt.engine = SegmentEngine(audiences, history_retention_ms=rt.engine.history_retention_ms,
                                  carried_attributes=rt.engine.carried_attributes)
        rt.processor.engine = rt.engine
        log.info("segments reloaded: %d audiences; re-evaluating changed ones on every partition", len(audiences))
        checked.clear()  # the timer below sends a defs-check to each assigned partition again

    consent = ConsentAttributes(rt.settings.config_dir / "destinations.yaml")
    consent.refresh(strict=True)  # a broken file stops the start, naming file and line
    rt.engine.carried_attributes = consent.attributes

    @rt.app.timer(2.0)
    async def reload_consent_rules() -> None:
        """destinations.yaml edited while running: membership messages carry its consent attributes from now
        on (pipeline.consent). Nothing is re-evaluated: a destination checks its rule on the messages it gets."""
        if consent.refresh():
            rt.engine.carried_attributes = consent.attributes
            log.info("consent rules reloaded: membership messages carry %s", list(consent.attributes))

    @rt.app.timer(1.0)
    async def record_acknowledged() -> None:
        """Keep the acknowledgement records up to date when no batch comes to do it (an idle worker)."""
        if stamps.stamped and not rt.app.rebalancing:
            stamps.record_acks()

    @rt.app.timer(0.5)
    async def fire_deadlines() -> None:
        # each newly assigned partition checks the audience definitions once (through its own stream,
        # so it runs in order with that partition's other messages)
        # (the profile table's partitions: the stage consumer reads those of the ops topic. Sent as soon as
        # Faust assigns them, recovered or not: the check then comes before what the replayed stage messages
        # send to the partition, and its resumption of interrupted merges first.)
        for partition in sorted(walks.table.active() - checked):
            checked.add(partition)
            rt.send(Send(PROFILE_TOPIC, "defs-check", DefsCheck()), partition=partition)
        for pid in deadlines.due(rt.now_ms()):
            rt.send(Send(PROFILE_TOPIC, pid, Tick(pid=pid)))
