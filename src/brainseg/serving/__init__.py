"""The web service: an inference engine that keeps models loaded, and the FastAPI app.

``api`` (``create_app``: wires the rest together; ``app`` for uvicorn), ``routes/`` (one router
per concern: system, segment, results), ``deps`` (shared objects as FastAPI dependencies),
``parsing`` (request parameters and files), ``answers`` (the JSON answers), ``render`` (PNG),
``middleware`` (API key, rate limit, load shedding, upload limit, server faults), ``errors``
(error bodies, documented status codes, handlers), ``engine`` (models loaded once through the
registry, by name and precision), ``batching`` (micro-batching of concurrent slices), ``uploads``
(what a request's files are, size limits), ``store`` (the result store), ``settings``
(``BRAINSEG_*``). No torch import anywhere here when the models are ONNX.
"""
