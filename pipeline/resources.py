"""The files shipped with the package: topics.yaml, the Avro schemas and the example configuration."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _shipped(name: str) -> Path:
    # pipeline/_data/ holds symlinks to the top-level topics.yaml, schemas/ and config/example/ (the one copy
    # in git); a built wheel holds the files themselves (package-data in pyproject.toml), so the same lookup
    # works from a checkout, an editable install and an installed wheel.
    path = files("pipeline").joinpath("_data", name)
    if not isinstance(path, Path):
        raise RuntimeError(f"pipeline is imported from an archive; install it as files to read {name}")
    return path.resolve()  # in a checkout, the top-level file: the one an error message should name


TOPICS_FILE = _shipped("topics.yaml")
SCHEMAS_DIR = _shipped("schemas")
EXAMPLE_CONFIG_DIR = _shipped("example")  # identity.yaml, datasets.yaml, segments.yaml, destinations.yaml
