"""Ingest: decode Avro records from producers, extract and normalise identities, reject bad input."""
