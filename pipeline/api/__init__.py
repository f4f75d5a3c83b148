"""HTTP API served by the worker: profile lookup, edge evaluation, audiences, metrics."""
