"""Identity stage: applies pipeline.identity.stitch to messages keyed by identity, from Kafka (never in-process)."""

from __future__ import annotations

from pipeline.identity.stitch import handle_identity
from pipeline.observability import metrics
from pipeline.privacy.erasure import erase_at_identity
from pipeline.runtime import Runtime
from pipeline.stages.agents import Stage
from pipeline.stages.delivery import LocalItem
from pipeline.stages.messages import Erase, op_of
from pipeline.topics import IDENTITY_TOPIC


def register(rt: Runtime) -> Stage:
    """The identity stage, for the stage consumer (pipeline.stages.agents)."""
    table = rt.ptables["identity"]

    def handle(items: list[LocalItem]) -> None:
        """Each message in order: read its identity's owner, write what the stage decides, send the rest."""
        for partition, key_b, msg in items:
            try:
                current = table.get(partition, key_b)
                owner = current.decode() if current else None
                res = (erase_at_identity(key_b.decode(), owner, msg, rt.now_ms()) if isinstance(msg, Erase)
                       else handle_identity(key_b.decode(), owner, msg))
                # the sends first: a send refused (too large) leaves the table as it was
                for send in res.sends:
                    rt.send(send)
                if res.write is not None:
                    table.put(partition, key_b, res.write.encode())
                elif res.delete:
                    table.delete(partition, key_b)
            except Exception as exc:  # noqa: BLE001 - one message never stops the stage
                rt.dead_letter_stage(IDENTITY_TOPIC, key_b, msg, exc)
                continue
            rt.tally.add(metrics.IDENTITY_OPS, op_of(msg))

    # Not registered for local delivery: identity-stage messages always go through Kafka, so that a crash can be
    # recovered by handling them again in their log's order (pipeline.identity.stitch.in_process_allowed).

    async def identity(items: list[LocalItem]) -> int:
        with rt.local_delivery():
            handle(items)
        return len(items)

    return Stage(IDENTITY_TOPIC, table.active, identity)
