"""The serving half of `make demo`: start the embedded server on the exported model, send real
test images through gRPC and REST, print predictions and accuracy, stop the server cleanly.

Run after `convstack train` has exported a version: `python -m convstack.demo.serve`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from convstack.common.logs import configure_logging
from convstack.serving.process import ServerProcess


def grpc_predictions(target: str, model_name: str, images: np.ndarray):
    """All test images through the convstack client (validated locally, split into requests
    under the message limit, sent concurrently)."""
    from convstack.client import PredictionClient

    with PredictionClient(target, model_name) as model:
        served_version = model.wait_until_available(timeout=30)
        classes = model.predict_many(images, batch_size=64)["classes"]
    return classes, served_version


def cli_table(target: str, model_name: str, images: np.ndarray, directory: Path) -> str:
    """`convstack predict` on PNG files, as a user would run it."""
    from PIL import Image

    paths = []
    for index, image in enumerate(images):
        path = directory / f"test-{index}.png"
        Image.fromarray(np.uint8(np.rint(image[..., 0] * 255))).save(path)
        paths.append(str(path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convstack.cli",
            "predict",
            "--target",
            target,
            "--model",
            model_name,
            *paths,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


def rest_predictions(port: int, model_name: str, images: np.ndarray) -> list[dict]:
    body = json.dumps({"instances": images.tolist()}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/{model_name}:predict", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["predictions"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convstack.demo.serve", description=__doc__)
    parser.add_argument("--model-base", default="build/demo/models")
    parser.add_argument("--model-name", default="digits")
    args = parser.parse_args(argv)
    configure_logging()  # before TensorFlow: quiet as the CLIs are
    from convstack.trainer.data import load_dataset

    images, labels = load_dataset("digits").arrays("test")
    logs = tempfile.TemporaryDirectory()
    server = ServerProcess.start(
        args.model_name, Path(args.model_base) / args.model_name, Path(logs.name) / "server.log"
    )
    grpc_port, rest_port = server.grpc_port, server.rest_port
    print(
        f"\n== serving {args.model_base}/{args.model_name} on gRPC :{grpc_port}, REST :{rest_port}"
    )
    try:
        server.wait_available(args.model_name)
        started = time.perf_counter()
        predicted, version = grpc_predictions(f"127.0.0.1:{grpc_port}", args.model_name, images)
        seconds = time.perf_counter() - started
        accuracy = float(np.mean(predicted == labels))
        print(
            f"gRPC: {len(images)} test images, served by version {version} in {seconds:.2f}s: "
            f"accuracy {accuracy:.4f}"
        )
        with tempfile.TemporaryDirectory() as directory:
            print(
                f"$ convstack predict --target 127.0.0.1:{grpc_port} --model "
                f"{args.model_name} test-0.png test-1.png test-2.png"
            )
            print(cli_table(f"127.0.0.1:{grpc_port}", args.model_name, images[:3], Path(directory)))
        rows = rest_predictions(rest_port, args.model_name, images[:8])
        print("REST: first 8 test images")
        print("  label  predicted  probability")
        for label, row in zip(labels[:8], rows, strict=True):
            probability = max(row["probabilities"])
            print(f"  {label:>5}  {row['classes']:>9}  {probability:>11.4f}")
    finally:
        code = server.stop(timeout=60)
        logs.cleanup()
    print(f"server stopped with exit status {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
