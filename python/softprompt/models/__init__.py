"""Frozen pretrained transformers in NumPy: forward, and backward with respect to their inputs."""

from .base import ModelConfig, Transformer
from .loading import default_model_path, load_model

__all__ = ["ModelConfig", "Transformer", "load_model", "default_model_path"]
