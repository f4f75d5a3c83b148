"""Identity agent: applies pipeline.identity.stitch to messages keyed by identity."""

from __future__ import annotations

from typing import Any

from pipeline.identity.stitch import handle_identity
from pipeline.observability import metrics
from pipeline.runtime import Runtime


def register(rt: Runtime) -> None:
    table = rt.tables["identity"]
    codec = rt.registry["internal.identity"].codec

    async def identity(stream: Any) -> None:
        async for event in stream.events():
            key_b: bytes = event.key
            msg = codec.decode(event.value)
            current = table.get(key_b)
            res = handle_identity(key_b.decode(), current.decode() if current else None, msg)
            if res.write is not None:
                table[key_b] = res.write.encode()
            elif res.delete:
                table.pop(key_b, None)
            for send in res.sends:
                await rt.emit(send)
            metrics.IDENTITY_OPS.labels(msg["op"]).inc()

    rt.app.agent(rt.topic("internal.identity"), name="identity")(identity)
