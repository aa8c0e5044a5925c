"""MEND-VL (spec §7): config, gradient transform, editor and training."""
from .config import MENDConfig
from .editor import MENDVL

__all__ = ["MENDConfig", "MENDVL"]
