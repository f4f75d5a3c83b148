"""Real-time customer data pipeline: ingest, identity stitching, audiences, activation."""

__version__ = "0.1.0"
