"""The service's routes, one ``APIRouter`` per concern: ``system`` (/, /health, /v1/models),
``segment`` (POST /v1/segment) and ``results`` (/v1/results/...)."""
