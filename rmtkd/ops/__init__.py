"""Ops with a torch reference and backend dispatch (torch | triton | cuda)."""
from .dispatch import BACKENDS, resolve_backend

__all__ = ["BACKENDS", "resolve_backend"]
