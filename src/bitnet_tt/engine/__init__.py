"""The generation engine: requests, slot scheduling, sampling and streaming; it knows no backend internals."""

from .engine import Engine
from .request import Request, RequestOutput, RequestStatus

__all__ = ["Engine", "Request", "RequestOutput", "RequestStatus"]
