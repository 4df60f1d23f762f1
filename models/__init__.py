"""The networks: R2-D4 and the MOST family, their shared blocks, specs and registry."""

from models import most, r2d4  # noqa: F401  (registers the networks)
from models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
