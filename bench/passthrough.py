"""The ceiling: a plain passthrough on the worker's ingest client stack and settings.

Consumes Avro ExperienceEvents from a copy topic with the worker's ingest consumer (librdkafka, batches of up
to 500 taken without blocking the asyncio loop), decodes them with the registry codec, re-encodes and
produces each to an output topic through the worker's output producer (flushed before each 1 s commit):
the pipeline's ingest path with the pipeline taken out. Writes {n, first_ts, t10_ts, last_ts, errors} to
BENCH_RESULT once BENCH_N messages went through.
Run as `python -m bench.passthrough` with KAFKA_BOOTSTRAP, BENCH_IN, BENCH_OUT, BENCH_N, BENCH_RESULT,
BENCH_APP_ID, PIPELINE_TOPIC_PREFIX in the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from confluent_kafka import Consumer, TopicPartition

from pipeline.connection import KafkaConnection, client_config
from pipeline.errors import SerdeError
from pipeline.ingest.agents import BATCH_MAX, COMMIT_INTERVAL_S, IDLE_SLEEP_S, consumer_config
from pipeline.runtime import OutputProducer
from pipeline.settings import load_topics


async def main() -> None:
    kafka = KafkaConnection.from_env(os.environ)
    codec = load_topics()["ingest.events"].codec
    n_total = int(os.environ.get("BENCH_N", "50000"))
    result = os.environ.get("BENCH_RESULT", "/tmp/passthrough.json")
    out_topic = os.environ.get("BENCH_OUT", "bench.out")
    consumer = Consumer(client_config(kafka, consumer_config(os.environ.get("BENCH_APP_ID", "bench-pt"),
                                                               "bench-passthrough")))
    consumer.subscribe([os.environ.get("BENCH_IN", "bench.in")])
    output = OutputProducer(kafka)
    n, errors, first, t10 = 0, 0, 0.0, 0.0
    done: dict[tuple[str, int], int] = {}
    last_commit = time.monotonic()
    while n < n_total:
        msgs = consumer.consume(BATCH_MAX, 0)
        for msg in msgs:
            if msg.error() is not None:
                continue
            first = first or time.time()
            try:
                output.produce(out_topic, msg.key(), codec.encode(codec.decode(msg.value())))
            except SerdeError:
                errors += 1
            done[(msg.topic(), msg.partition())] = msg.offset() + 1  # type: ignore[index, operator]
            n += 1
            if n == n_total // 10:
                t10 = time.time()
        if time.monotonic() - last_commit >= COMMIT_INTERVAL_S and done:
            await output.flush()
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()], asynchronous=False)
            done.clear()
            last_commit = time.monotonic()
        await asyncio.sleep(0 if msgs else IDLE_SLEEP_S)
    last = time.time()
    await output.flush()
    consumer.close()
    with open(result + ".tmp", "w") as f:
        json.dump({"n": n, "first_ts": first, "t10_ts": t10, "last_ts": last, "errors": errors}, f)
    os.replace(result + ".tmp", result)


if __name__ == "__main__":
    asyncio.run(main())
