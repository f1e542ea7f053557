"""The service on Ray Serve: the same FastAPI app (``api.create_app``), one copy per replica.

``brainseg serve --ray [--replicas N | --autoscale MIN-MAX]`` starts it (``run``); ``serve deploy
deploy/serve.yaml`` (or ``serve run deploy/serve.yaml``) deploys ``app`` below to a running cluster.

Each replica builds the app when it starts (``serve.ingress`` with a builder, so nothing is pickled
but this module's names), which runs the app's lifespan: the default model is loaded before the
replica takes traffic, and ``check_health`` (Ray Serve's probe) fails while it is not loaded. The
replicas share nothing in memory: results go to ``BRAINSEG_RESULT_DIR``, which must be one folder
for all of them (a shared filesystem across machines, as for several uvicorn workers; see the README),
with one ``BRAINSEG_OWNER_SECRET`` (or the ``.owner-secret`` file the first replica writes there).
Settings are the ``BRAINSEG_*`` variables, passed to every replica (``replica_env``). Load shedding,
limits and the memory budget apply per replica; ``max_ongoing_requests`` is set so that a replica's
own queue (``BRAINSEG_MAX_CONCURRENT`` + ``BRAINSEG_MAX_QUEUE``) decides, not Ray's.
"""

from __future__ import annotations

import os
import time

from ray import serve

DEPLOYMENT = "brainseg"
APP_NAME = "brainseg"


def build_app():
    """On each replica: the service, from its ``BRAINSEG_*`` environment."""
    from .api import create_app

    return create_app()


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(build_app)
class Brainseg:
    """A replica: the FastAPI app (routes, middleware, models loaded once)."""

    async def check_health(self) -> None:
        """Ray Serve's health probe: a replica whose default model is not loaded is restarted."""
        engine = getattr(getattr(getattr(self, "_asgi_app", None), "state", None), "engine", None)  # Serve's ASGI wrapper keeps the app there
        if engine is not None and engine.settings.preload and engine.default_name() not in engine.loaded():
            raise RuntimeError("the default model is not loaded")


app = Brainseg.bind()  # for deploy/serve.yaml (import_path brainseg.serving.ray_serve:app)


def replica_env(cpus: float) -> dict[str, str]:
    """The ``BRAINSEG_*`` variables of this process, for every replica; ONNX Runtime threads = the replica's CPUs unless set."""
    env = {k: v for k, v in os.environ.items() if k.startswith("BRAINSEG_")}
    env.setdefault("BRAINSEG_ONNX_THREADS", str(max(1, int(cpus))))
    return env


def parse_autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or not 0 <= int(lo) <= int(hi) or int(hi) < 1:
        raise ValueError(f"--autoscale must be MIN-MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return int(lo), int(hi)


def application(replicas: int | None = None, autoscale: str | None = None, cpus: float = 1.0, max_ongoing: int | None = None):
    """The bound Serve application: ``replicas`` fixed replicas, or autoscaling between ``MIN-MAX`` on ongoing requests."""
    from .settings import Settings

    settings = Settings.from_env()
    ongoing = max_ongoing or settings.max_concurrent + settings.max_queue
    options: dict = {
        "ray_actor_options": {"num_cpus": cpus, "runtime_env": {"env_vars": replica_env(cpus)}},
        "max_ongoing_requests": ongoing,
    }
    if autoscale:
        lo, hi = parse_autoscale(autoscale)
        # scale on requests in flight per replica: more than the replica runs at once (BRAINSEG_MAX_CONCURRENT) means a queue
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "initial_replicas": max(lo, 1),
            "target_ongoing_requests": max(1, settings.max_concurrent // 2),
        }
    else:
        options["num_replicas"] = replicas or 1
    return Brainseg.options(**options).bind()


def run(host: str, port: int, replicas: int | None, autoscale: str | None, address: str | None, cpus: float = 1.0) -> None:
    """Start Ray (``address``: None starts one here, ``auto`` / HOST:PORT joins a cluster), Serve's HTTP proxy on
    ``host:port``, and the application; blocks until interrupted, then shuts the application down."""
    import signal

    import ray

    def stop(signum, frame):  # SIGTERM too (a container's stop, kill): the application is deleted on the way out
        raise KeyboardInterrupt

    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(include_dashboard=False, logging_level="WARNING")
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs a SIGTERM handler of its own that aborts the process
    signal.signal(signal.SIGINT, stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(replicas, autoscale, cpus), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"brainseg on Ray Serve: http://{host}:{port} ({f'autoscaling {autoscale}' if autoscale else f'{replicas or 1} replica(s)'})", flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
        ray.shutdown()
