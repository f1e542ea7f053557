"""Entry point for ``uvicorn app:app --reload`` from the repository root (see brainseg.serving.api)."""

from brainseg.serving.api import app

__all__ = ["app"]
