"""Configuration: the pydantic models and the layered loader that validates against them."""

from kapsis.config.loader import LoadedConfig, Origin, load_config
from kapsis.config.models import DEFAULT_IMAGE, KapsisConfig

__all__ = ["DEFAULT_IMAGE", "KapsisConfig", "LoadedConfig", "Origin", "load_config"]
