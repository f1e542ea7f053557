"""The web service: an inference engine that keeps models loaded, and the FastAPI app.

``engine`` (models cached by name, ONNX Runtime on CPU), ``uploads`` (what a request's
files are, size limits), ``store`` (bounded result store), ``api`` (the HTTP routes).
No torch import anywhere here when the models are ONNX.
"""
