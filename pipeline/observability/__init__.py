"""Observability: every Prometheus metric of the pipeline, defined in one module."""
