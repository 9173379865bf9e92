"""`/invocations` throughput of `mlflow models serve` for requests of 1, 100 and 10,000 images.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/serve_throughput.py \
        [--model-uri models:/mnist-cnn@production] [--sizes 1,100,10000] [--repeats 5]

Serves the model as docs/serving.md says (`--env-manager local`, CPU) on a free port, then posts
MNIST-shaped float32 images as JSON (`{"inputs": ...}`), the median of `--repeats` requests
per size. To say what dominates a request's time it also times, in this process and on the
same payload, the parts MLflow's scoring server does: parsing the JSON body into an array,
the model's `predict`, and writing the 10 probabilities per image back as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

from mnist_mlflow.predict import DEFAULT_MODEL_URI, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port  # noqa: E402

JSON = {"Content-Type": "application/json"}


def median_seconds(action, repeats: int) -> float:  # noqa: ANN001 - any callable
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI)
    parser.add_argument("--sizes", default="1,100,10000")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model_uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MLFLOW_DEFAULT_PREDICTION_DEVICE": "cpu"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("mlflow models serve did not come up")
            time.sleep(0.5)
        model = load_model(args.model_uri)
        rng = np.random.default_rng(0)
        print(f"{args.model_uri} served at {url}; median of {args.repeats} requests per size; "
              f"{os.cpu_count()} CPUs")
        print(f"{'images':>7} {'payload':>9} {'request':>9} {'images/s':>9} | in-process: "
              f"{'parse':>8} {'predict':>8} {'answer':>8}")
        for size in (int(s) for s in args.sizes.split(",")):
            images = rng.random((size, 1, 28, 28), dtype=np.float32)
            body = json.dumps({"inputs": images.tolist()})

            def post(body: str = body) -> None:
                response = requests.post(f"{url}/invocations", data=body, headers=JSON,
                                         timeout=600)
                response.raise_for_status()

            request = median_seconds(post, args.repeats)
            parse = median_seconds(lambda body=body: np.asarray(
                json.loads(body)["inputs"], dtype=np.float32), args.repeats)
            predict = median_seconds(lambda images=images: model.predict(images),
                                     args.repeats)
            scores = np.asarray(model.predict(images))
            answer = median_seconds(lambda scores=scores: json.dumps(
                {"predictions": scores.tolist()}), args.repeats)
            print(f"{size:>7} {len(body) / 1e6:>7.2f}MB {1000 * request:>7.1f}ms "
                  f"{size / request:>9.0f} | {'':11} {1000 * parse:>6.1f}ms "
                  f"{1000 * predict:>6.1f}ms {1000 * answer:>6.1f}ms", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
