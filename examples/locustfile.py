"""Drive a `dart-ee serve` server with locust (`pip install locust`), as an alternative to `dart-ee loadtest`:

    dart-ee serve --export runs/cifar10_alexnet/export --policy score --port 8000 --threads 1
    locust -f examples/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 60s

Each simulated user sends one image per request, as ``application/x-npy``, in the shape ``GET /info`` reports;
random pixels by default, or the images of a ``.npy`` file of uint8 (N, C, H, W) named by $DART_IMAGES. Locust's
users are closed loops (each waits for its answer); for open-loop arrivals and latency counted from the
scheduled send time, use `dart-ee loadtest`.
"""

import io
import json
import os
import urllib.request

import numpy as np
from locust import HttpUser, between, events, task

IMAGES: list[bytes] = []


@events.test_start.add_listener
def _images(environment, **_):
    """One request body per image, read once before the users start."""
    if os.environ.get("DART_IMAGES"):
        x = np.load(os.environ["DART_IMAGES"], allow_pickle=False)
    else:
        with urllib.request.urlopen(f"{environment.host}/info") as r:  # the served model's input shape
            shape = json.load(r)["input_shape"]
        x = np.random.default_rng(0).integers(0, 256, (64, *shape), dtype=np.uint8)
    for img in x:
        b = io.BytesIO()
        np.save(b, img)
        IMAGES.append(b.getvalue())


class Client(HttpUser):
    wait_time = between(0.0, 0.02)

    @task
    def predict(self):
        body = IMAGES[np.random.randint(len(IMAGES))]
        with self.client.post("/predict", data=body, headers={"content-type": "application/x-npy"},
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
