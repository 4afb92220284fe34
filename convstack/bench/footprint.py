"""`convstack bench footprint` (or `convstack bench client --footprint`): what the client
costs to install and to import, next to `tensorflow-serving-api` (what the client needed before
it had its own message definitions).

Import time is the median of `--runs` cold runs: each a fresh interpreter timing only the import
statement (the page cache stays warm, as on a machine that ran the program before). Installed
size is the sum of the files (from each distribution's RECORD) of a distribution and everything
it requires, extras' requirements left out. Both are measured in `--python` (default: this one),
so a fresh client-only venv can be measured from the full environment.

Standard library only: it runs in a client-only install too.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_OUT = "bench-results/client-footprint.json"
CLIENT_IMPORT = "from convstack.client import PredictionClient; PredictionClient"
TF_SERVING_IMPORT = "from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc"
TIMED = """
import sys, time
started = time.perf_counter()
{statement}
elapsed = time.perf_counter() - started
print(elapsed, len(sys.modules))
"""
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
MIB = 1024 * 1024


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str) -> dict:
    """Distributions `root` requires (transitively, no extras) and the MiB of their files."""
    from importlib import metadata

    seen: dict[str, int] = {}
    pending = [root]
    while pending:
        name = _normalize(pending.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # required only under a marker that does not hold here
        seen[name] = sum(_size(dist, path) for path in dist.files or ())
        for requirement in dist.requires or ():
            requirement_name, _, marker = requirement.partition(";")
            if "extra" in marker:
                continue
            match = _NAME.match(requirement_name)
            if match:
                pending.append(match.group(1))
    return {
        "distributions": len(seen),
        "mib": round(sum(seen.values()) / MIB, 1),
        "largest_mib": {
            name: round(size / MIB, 1)
            for name, size in sorted(seen.items(), key=lambda item: -item[1])[:5]
        },
    }


def _size(dist, path) -> int:
    try:
        return Path(dist.locate_file(path)).stat().st_size
    except OSError:
        return 0


def import_time(python: str, statement: str, runs: int) -> dict | None:
    """Median seconds (and modules loaded) of `statement` over `runs` fresh interpreters, or
    None when it cannot be imported there."""
    timings, modules = [], 0
    for _ in range(runs):
        result = subprocess.run(
            [python, "-c", TIMED.format(statement=statement)],
            capture_output=True,
            text=True,
            env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
            cwd="/",
        )
        if result.returncode != 0:
            return None
        seconds, count = result.stdout.split()
        timings.append(float(seconds))
        modules = int(count)
    return {"median_s": round(statistics.median(timings), 3), "runs": timings, "modules": modules}


def closure_in(python: str, root: str) -> dict | None:
    """`closure(root)` as seen by another interpreter (None if `root` is not installed)."""
    code = (
        "import json, sys; from convstack.bench.footprint import closure; "
        "print(json.dumps(closure(sys.argv[1])))"
    )
    result = subprocess.run([python, "-c", code, root], capture_output=True, text=True, cwd="/")
    if result.returncode != 0:
        return None
    found = json.loads(result.stdout)
    return found if found["distributions"] else None


def measure(python: str, tf_python: str, runs: int) -> dict:
    """The client's figures in `python`, TF Serving's in `tf_python`."""
    return {
        "client": {
            "python": python,
            "import": import_time(python, CLIENT_IMPORT, runs),
            # The floor on this machine right now: what numpy alone takes (a loaded machine
            # slows both alike).
            "import_numpy_alone": import_time(python, "import numpy", runs),
            "installed": closure_in(python, "convstack"),
        },
        "tensorflow_serving_api": {
            "python": tf_python,
            "import": import_time(tf_python, TF_SERVING_IMPORT, runs),
            "installed": closure_in(tf_python, "tensorflow-serving-api"),
        },
    }


def summary(report: dict) -> str:
    lines = []
    for who, figures in report.items():
        timing, size = figures["import"], figures["installed"]
        seconds = f"{timing['median_s']:.3f} s, {timing['modules']} modules" if timing else "n/a"
        installed = f"{size['mib']} MiB in {size['distributions']} distributions" if size else "n/a"
        lines.append(f"{who}: import {seconds}; installed {installed}")
    return "\n".join(lines)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convstack bench footprint", description=__doc__)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the client")
    parser.add_argument(
        "--tf-python", help="interpreter with tensorflow-serving-api (default: --python)"
    )
    parser.add_argument("--runs", type=int, default=5, help="cold imports per figure (5)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results ({DEFAULT_OUT})")
    return parser.parse_args(argv)


def bench_main(argv) -> int:
    """Measure, print a summary and save the JSON report."""
    args = parse_args(argv)
    report = measure(args.python, args.tf_python or args.python, args.runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
