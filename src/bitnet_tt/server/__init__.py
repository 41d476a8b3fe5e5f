"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn): `bitnet-tt serve`."""

from .app import EngineStopped, Limits, create_app, serve
from .guard import check_api_key

__all__ = ["EngineStopped", "Limits", "check_api_key", "create_app", "serve"]
