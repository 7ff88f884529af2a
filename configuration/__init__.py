"""Configuration classes (installed as `modeling_saisa.configuration`)."""

from .configuration_saisa import SaisaConfig

__all__ = ["SaisaConfig"]
