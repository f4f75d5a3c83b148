"""Throughput/latency benchmark of the pipeline worker on a real local Kafka broker: `python -m bench.run`."""
