"""Tests of pipeline.identity: namespaces, datasets, stitching (with its reference model and simulator)."""
