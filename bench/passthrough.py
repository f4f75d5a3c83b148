"""The ceiling: a plain Faust passthrough with the pipeline's client stack and settings.

One agent consumes Avro ExperienceEvents from a copy topic in batches (`take_events`, as the worker's agents),
decodes them with the registry codec, re-encodes and produces each to an output topic through the worker's
output producer (librdkafka, flushed before each commit), with the worker's consumer settings. It writes
{n, first_ts, last_ts, t10_ts} to BENCH_RESULT once BENCH_N messages went through.
Run as `python -m bench.passthrough worker` with KAFKA_BOOTSTRAP, BENCH_IN, BENCH_OUT, BENCH_N, BENCH_RESULT,
BENCH_APP_ID, BENCH_DATA_DIR, PIPELINE_TOPIC_PREFIX in the environment.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import faust

from pipeline.app import _flush_output_before_commit, shorten_fetch_wait
from pipeline.errors import SerdeError
from pipeline.runtime import OutputProducer
from pipeline.state.tables import ChangelogRouter
from pipeline.topics import TopicRegistry

reg = TopicRegistry.load(prefix=os.environ.get("PIPELINE_TOPIC_PREFIX", ""))
codec = reg["ingest.events"].codec
N = int(os.environ.get("BENCH_N", "50000"))
RESULT = os.environ.get("BENCH_RESULT", "/tmp/passthrough.json")

shorten_fetch_wait()
app = faust.App(
    os.environ.get("BENCH_APP_ID", "bench-passthrough"),
    broker=f"kafka://{os.environ.get('KAFKA_BOOTSTRAP', '127.0.0.1:9092')}",
    datadir=os.environ.get("BENCH_DATA_DIR", "/tmp/bench-passthrough"),
    topic_partitions=4,
    topic_replication_factor=1,
    topic_allow_declare=True,
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,
    producer_linger_ms=2,
    broker_commit_every=1_000_000,
    broker_commit_interval=1.0,
    broker_max_poll_records=2000,
    stream_buffer_maxsize=16384,
    stream_wait_empty=False,
    web_enabled=False,
    logging_config=None,
)
src = app.topic(os.environ.get("BENCH_IN", "bench.in"), key_type=bytes, value_type=bytes, key_serializer="raw",
                value_serializer="raw", partitions=4, internal=False)
dst = app.topic(os.environ.get("BENCH_OUT", "bench.out"), key_type=bytes, value_type=bytes,
                key_serializer="raw", value_serializer="raw", partitions=4, internal=False)
state: dict[str, Any] = {"n": 0, "first": None, "t10": None, "errors": 0}
output = OutputProducer(os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
_flush_output_before_commit(app, output, ChangelogRouter(output.produce))
out_name = os.environ.get("BENCH_OUT", "bench.out")


@app.agent(src, name="passthrough")
async def passthrough(stream: Any) -> None:
    async for events in stream.take_events(500, within=0.01):
        for event in events:
            if state["first"] is None:
                state["first"] = time.time()
            try:
                value = codec.decode(event.value)
                output.produce(out_name, event.key, codec.encode(value))
            except SerdeError:
                state["errors"] += 1
            state["n"] += 1
            count(state["n"])


def count(n: int) -> None:
    if n == N // 10:
        state["t10"] = time.time()
    if n == N:
        with open(RESULT + ".tmp", "w") as f:
            json.dump({"n": n, "first_ts": state["first"], "t10_ts": state["t10"], "last_ts": time.time(),
                       "errors": state["errors"]}, f)
        os.replace(RESULT + ".tmp", RESULT)


if __name__ == "__main__":
    faust.Worker(app, loglevel="info").execute_from_commandline()
