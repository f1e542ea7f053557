"""The service on Ray Serve (``serving.ray_serve``): two replicas on a local Ray instance (2 CPUs, a 200 MB
object store, no dashboard; skipped where Ray is not installed), each loading the tiny models before it takes
traffic; a result made through one replica is read through any (the shared result folder); /metrics and the
probes answer through Serve's proxy; deploy/serve.yaml names the application.

Models are the tiny ones of ``conftest.tiny_model_dir``.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[scale]' or -r requirements-dev.txt); the Ray Serve tests are skipped")


def test_two_replicas_serve_the_app_with_one_result_folder(local_ray, tiny_model_dir, tmp_path, monkeypatch):
    import httpx
    from conftest import free_port
    from ray import serve

    from brainseg.io.synthetic import synthetic_png
    from brainseg.serving.ray_serve import APP_NAME, application

    results = tmp_path / "results"
    for key, value in {"BRAINSEG_MODEL_DIR": str(tiny_model_dir), "BRAINSEG_BACKEND": "onnx", "BRAINSEG_RESULT_DIR": str(results)}.items():
        monkeypatch.setenv(key, value)  # what the replicas get (serving.ray_serve.replica_env)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(application(replicas=2), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        status = serve.status().applications[APP_NAME]
        assert status.status == "RUNNING"
        (deployment,) = status.deployments.values()
        assert deployment.replica_states.get("RUNNING") == 2
        for _ in range(4):  # each replica loaded the default model before taking traffic
            r = httpx.get(url + "/health/ready", timeout=30)
            assert r.status_code == 200 and r.json()["ready"] is True, r.text
        r = httpx.post(url + "/v1/segment", files={"files": ("s.png", synthetic_png(size=64))}, timeout=60)
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        assert [p.name for p in results.glob("*.npz")] == [f"{rid}.npz"]
        for _ in range(8):  # requests spread over both replicas: every one finds the result in the shared folder
            got = httpx.get(f"{url}/v1/results/{rid}", timeout=30)
            assert got.status_code == 200 and got.json()["id"] == rid
        scraped = [httpx.get(url + "/metrics", timeout=30).text for _ in range(6)]
        assert all("brainseg_http_requests_total" in text for text in scraped)
        assert any('route="/v1/segment"' in text for text in scraped)  # the replica that segmented counted it
    finally:
        serve.shutdown()


def test_autoscale_and_the_serve_config():
    import yaml
    from conftest import REPO

    from brainseg.serving.ray_serve import parse_autoscale

    assert parse_autoscale("1-4") == (1, 4) and parse_autoscale("0-2") == (0, 2)
    for bad in ("4-1", "2", "a-b", "0-0", "-1-3"):
        with pytest.raises(ValueError, match="--autoscale must be MIN-MAX"):
            parse_autoscale(bad)
    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "brainseg.serving.ray_serve:app" and app["route_prefix"] == "/"
    import importlib

    module, name = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), name) is not None
    (deployment,) = app["deployments"]
    assert deployment["name"] == "brainseg"
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(config)  # Ray's own schema
