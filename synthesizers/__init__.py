"""Model-inversion synthesizers: images from a frozen teacher alone (DeepInversion, CMI).

Importing the package registers every method; `get_synthesizer(name)` returns its class.
"""

from synthesizers.base import (
    SYNTHESIZERS,
    SynthesisBatch,
    Synthesizer,
    get_synthesizer,
    list_synthesizers,
    register,
)
from synthesizers.bn_stats import BatchNormStatistics
from synthesizers.cmi import CMI, CMIConfig
from synthesizers.deepinversion import DeepInversion, DeepInversionConfig

__all__ = [
    "SYNTHESIZERS",
    "BatchNormStatistics",
    "CMI",
    "CMIConfig",
    "DeepInversion",
    "DeepInversionConfig",
    "SynthesisBatch",
    "Synthesizer",
    "get_synthesizer",
    "list_synthesizers",
    "register",
]
