"""``app:app`` whose segmentations fail with a server fault (a 500 with an error id), for tests of how the page shows one.

Test-only: ``python -m uvicorn faulty_app:app`` with ``tests/`` and the repository root on PYTHONPATH.
"""

from app import app


def _fault(*args, **kwargs):
    raise RuntimeError("a fault planted by tests/faulty_app.py")


app.state.engine.run_slice = _fault
app.state.engine.run_volume = _fault
