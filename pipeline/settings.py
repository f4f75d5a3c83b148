"""Runtime settings from the environment (and CLI flags), plus the worker's configuration folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.identity.datasets import load_datasets_config
from pipeline.identity.namespaces import load_identity_config
from pipeline.profiles.config import ProfileConfig
from pipeline.segments import AudienceDef, load_segments

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "config" / "example"


@dataclass(frozen=True)
class Settings:
    bootstrap: str
    app_id: str
    config_dir: Path
    data_dir: Path
    web_port: int
    topic_prefix: str
    worker_name: str

    @classmethod
    def from_env(cls, config_dir: str | Path | None = None) -> Settings:
        return cls(
            bootstrap=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            app_id=os.environ.get("PIPELINE_APP_ID", "cdp-pipeline"),
            config_dir=Path(config_dir or os.environ.get("PIPELINE_CONFIG") or DEFAULT_CONFIG),
            data_dir=Path(os.environ.get("PIPELINE_DATA_DIR", ROOT / "data")),
            web_port=int(os.environ.get("PIPELINE_WEB_PORT", "6066")),
            topic_prefix=os.environ.get("PIPELINE_TOPIC_PREFIX", ""),
            worker_name=os.environ.get("PIPELINE_WORKER_NAME", "worker-1"),
        )


@dataclass(frozen=True)
class PipelineConfig:
    """Everything in the configuration folder: identity namespaces, datasets, audiences."""

    directory: Path
    profile: ProfileConfig
    audiences: list[AudienceDef]

    @classmethod
    def load(cls, directory: Path) -> PipelineConfig:
        """Load identity.yaml, datasets.yaml and segments.yaml; ConfigError names file and line."""
        if not directory.is_dir():
            raise ConfigError("configuration folder does not exist", file=str(directory))
        for name in ("identity.yaml", "datasets.yaml", "segments.yaml"):
            if not (directory / name).exists():
                raise ConfigError(f"missing {name} in the configuration folder", file=str(directory / name))
        profile = ProfileConfig(load_identity_config(directory / "identity.yaml"),
                                load_datasets_config(directory / "datasets.yaml"))
        return cls(directory, profile, load_segments(directory / "segments.yaml"))
