"""``app:app`` with an ``X-Worker-Pid`` header on every answer, for tests that must see which worker answered.

Test-only: ``python -m uvicorn pid_app:app --workers 2`` with ``tests/`` and the repository root on PYTHONPATH.
"""

import os

from app import app


@app.middleware("http")
async def worker_pid(request, call_next):
    response = await call_next(request)
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response
