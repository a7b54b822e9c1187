"""Models by name: the registry (torch-free) and the built-in zoo it is filled with on import."""

from dfkd.models import zoo
from dfkd.models.registry import ModelSpec, check_model_name, create_model, list_models, model_spec, register_model

__all__ = ["ModelSpec", "check_model_name", "create_model", "list_models", "model_spec", "register_model", "zoo"]
