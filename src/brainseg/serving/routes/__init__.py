"""The service's routes, one ``APIRouter`` per concern: ``system`` (/, /health, /v1/models),
``probes`` (/health/live, /health/ready, /metrics), ``segment`` (POST /v1/segment) and ``results`` (/v1/results/...)."""
