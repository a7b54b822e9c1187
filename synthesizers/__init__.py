"""Model-inversion synthesizers: images from a frozen teacher alone (DeepInversion, CMI, Fast-DFKD).

Importing the package loads no torch: the registry and the settings classes are torch-free, and
`get_synthesizer(name)` imports a method's implementation when it is first built.
"""

from synthesizers.configs import CMIConfig, DeepInversionConfig, FastConfig, MethodConfig
from synthesizers.registry import (
    METHODS,
    get_synthesizer,
    list_synthesizers,
    method_config_class,
    register,
    student_term,
)

__all__ = [
    "METHODS",
    "CMIConfig",
    "DeepInversionConfig",
    "FastConfig",
    "MethodConfig",
    "get_synthesizer",
    "list_synthesizers",
    "method_config_class",
    "register",
    "student_term",
]
