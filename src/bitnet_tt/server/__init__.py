"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn): `bitnet-tt serve`."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
