"""The bundle of identity and datasets config that the profile merge functions take."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.identity.datasets import DatasetsConfig, load_datasets_config
from pipeline.identity.namespaces import IdentityConfig, load_identity_config


@dataclass(frozen=True)
class ProfileConfig:
    """Everything `pipeline.profiles.merge` needs: namespaces, merge policy and history bounds."""

    identity: IdentityConfig
    datasets: DatasetsConfig


def load_profile_config(identity_path: str | Path, datasets_path: str | Path) -> ProfileConfig:
    """Load both YAML files (ConfigError names the file and line of the first problem)."""
    return ProfileConfig(load_identity_config(identity_path), load_datasets_config(datasets_path))
