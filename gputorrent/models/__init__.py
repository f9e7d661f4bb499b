"""GGUF models: the catalog of known aliases, pulling, metadata and model ids."""

from .catalog import CATALOG, CatalogEntry, ModelError, content_id, local_models, pull
from .gguf_info import ModelInfo, model_id, read_info
from .local import resolve

__all__ = ["CATALOG", "CatalogEntry", "ModelError", "ModelInfo", "content_id", "local_models", "model_id",
           "pull", "read_info", "resolve"]
