"""The same app as a Ray Serve deployment, for several replicas on one machine or a cluster
(``pip install -e ".[serve-ray]"``).

Each replica is the FastAPI app of ``dart_ee.serve.app`` with its own engine and batcher; Ray's HTTP proxy
spreads requests across the replicas. From Python::

    from ray import serve
    from dart_ee.serve.ray_serve import deployment
    serve.run(deployment({"policy": "score", "export": "runs/x/export"}, replicas=2), route_prefix="/")

or ``dart-ee serve --export DIR --policy P --ray-replicas 2``.
"""

from __future__ import annotations

from typing import Any

from dart_ee.config import ServeConfig
from dart_ee.core.errors import ConfigError
from dart_ee.serve.app import create_app
from dart_ee.serve.engine import make_engine


def deployment(spec: dict[str, Any], cfg: ServeConfig | None = None, replicas: int = 2,
               cpus_per_replica: float = 1.0) -> Any:
    """A bound Ray Serve application: ``replicas`` copies of the app serving ``make_engine(**spec)``."""
    try:
        from ray import serve
    except ImportError as e:
        raise ConfigError("Ray Serve is not installed: pip install -e '.[serve-ray]'") from e
    cfg = cfg or ServeConfig()
    app = create_app(lambda: make_engine(**spec, threads=cfg.threads), cfg)

    @serve.deployment(name="dart-ee", num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=cfg.max_queue)
    @serve.ingress(app)
    class DartEE:
        """One replica: the app's lifespan loads the engine and starts its batcher."""

    return DartEE.bind()  # type: ignore[attr-defined]


def run(spec: dict[str, Any], cfg: ServeConfig, replicas: int, cpus_per_replica: float = 1.0) -> None:
    """Start Ray locally (or join ``RAY_ADDRESS``), serve on ``cfg.host:cfg.port`` until interrupted."""
    import time

    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(deployment(spec, cfg, replicas, cpus_per_replica), route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
