"""Render the Kustomize overlays under `k8s/` and validate them against Kubernetes' schemas.

Rendering runs the real `kubectl kustomize` (a subprocess; no cluster is contacted). Validation
checks every object, strictly (unknown fields are errors), against the OpenAPI schema of one
pinned Kubernetes version, with the `kubernetes-validate` package. Both are pure apart from that
subprocess, so the launcher and the tests share them.

    python -m convstack.k8s.render local              # print the manifests
    python -m convstack.k8s.render --all --out-dir build/k8s
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from convstack.common.files import write_atomic

__all__ = [
    "KUBERNETES_VERSION",
    "ManifestValidationError",
    "RenderError",
    "UnknownOverlayError",
    "describe",
    "k8s_root",
    "overlay_names",
    "render",
    "render_main",
    "render_yaml",
    "validate",
    "validation_errors",
]

# The Kubernetes version the manifests are written for and validated against (podFailurePolicy,
# podReplacementPolicy, PDB unhealthyPodEvictionPolicy and matchLabelKeys are all GA or on by
# default there). kind's node image and the namespace's Pod Security level use the same one.
KUBERNETES_VERSION = "1.32"
K8S_DIR_ENV = "CONVSTACK_K8S_DIR"
_KUSTOMIZE_TIMEOUT_SECONDS = 120


class RenderError(RuntimeError):
    """An overlay could not be rendered; the message is one line."""


class UnknownOverlayError(RenderError):
    """The overlay named does not exist; the message lists the ones that do."""


class ManifestValidationError(ValueError):
    """Rendered objects do not match the Kubernetes schema. `problems` has one line each."""

    def __init__(self, problems: list[str], kubernetes_version: str) -> None:
        self.problems = problems
        self.kubernetes_version = kubernetes_version
        super().__init__(
            f"{len(problems)} object(s) invalid for Kubernetes {kubernetes_version}: "
            + "; ".join(problems)
        )


def k8s_root() -> Path:
    """The `k8s/` directory: $CONVSTACK_K8S_DIR, else the source checkout this module is in,
    else ./k8s."""
    candidates = []
    if os.environ.get(K8S_DIR_ENV):
        candidates.append(Path(os.environ[K8S_DIR_ENV]))
    candidates += [Path(__file__).resolve().parents[2] / "k8s", Path.cwd() / "k8s"]
    for candidate in candidates:
        if (candidate / "overlays").is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise RenderError(f"no k8s/overlays directory found (tried {tried}); set ${K8S_DIR_ENV}")


def overlay_names(root: Path | None = None) -> list[str]:
    """The overlays under `root/overlays` (directories holding a kustomization.yaml)."""
    overlays = (root or k8s_root()) / "overlays"
    return sorted(p.parent.name for p in overlays.glob("*/kustomization.yaml"))


def render_yaml(overlay: str, *, root: Path | None = None, kubectl: str = "kubectl") -> str:
    """The overlay's manifests as `kubectl kustomize` prints them (one YAML stream)."""
    root = root or k8s_root()
    available = overlay_names(root)
    if overlay not in available:
        raise UnknownOverlayError(
            f"unknown overlay {overlay!r}; available: {', '.join(available) or 'none'}"
        )
    executable = shutil.which(kubectl)
    if executable is None:
        raise RenderError(
            f"{kubectl!r} not found on PATH; install kubectl (1.27 or newer, for its built-in "
            "kustomize v5)"
        )
    directory = root / "overlays" / overlay
    try:
        result = subprocess.run(
            [executable, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=_KUSTOMIZE_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RenderError(
            f"kubectl kustomize {directory}: no answer in {exc.timeout:.0f} s"
        ) from exc
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise RenderError(f"kubectl kustomize {directory}: {reason}")
    return result.stdout


def render(overlay: str, *, root: Path | None = None, kubectl: str = "kubectl") -> list[dict]:
    """The overlay's objects, parsed, in kustomize's output order."""
    text = render_yaml(overlay, root=root, kubectl=kubectl)
    return [document for document in yaml.safe_load_all(text) if document]


def describe(obj: dict) -> str:
    """`Kind/name` (with `namespace/` when set), for messages."""
    metadata = obj.get("metadata") or {}
    namespace = f"{metadata['namespace']}/" if metadata.get("namespace") else ""
    return f"{obj.get('kind', '?')}/{namespace}{metadata.get('name', '?')}"


def validation_errors(
    objects: Iterable[dict], kubernetes_version: str = KUBERNETES_VERSION
) -> list[str]:
    """One line per object that fails strict validation against `kubernetes_version`'s schema
    (unknown fields, wrong types, missing required fields, unknown kinds); empty when all pass."""
    kubernetes_validate = _import_validator()
    from kubernetes_validate.utils import VersionNotSupportedError

    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.absolute_path) or "<top level>"
            problems.append(f"{describe(obj)}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{describe(obj)}: {exc.message}")
        except VersionNotSupportedError as exc:
            raise ValueError(exc.message) from exc
        except (KeyError, TypeError) as exc:  # not an object at all (no kind or apiVersion)
            problems.append(f"{describe(obj)}: not a Kubernetes object ({exc!r} missing)")
    return problems


def validate(objects: Iterable[dict], kubernetes_version: str = KUBERNETES_VERSION) -> None:
    """Raise ManifestValidationError listing every object that is invalid for the version."""
    problems = validation_errors(objects, kubernetes_version)
    if problems:
        raise ManifestValidationError(problems, kubernetes_version)


def _import_validator():
    try:
        import kubernetes_validate
    except ImportError as exc:
        raise RenderError(
            "validation needs the kubernetes-validate package (the project's dev extra)"
        ) from exc
    return kubernetes_validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack k8s render",
        description="Render a Kustomize overlay of k8s/ with `kubectl kustomize`, validate every "
        "object against the Kubernetes schema, and print the manifests.",
    )
    parser.add_argument("overlay", nargs="?", help="overlay name (see k8s/overlays)")
    parser.add_argument("--all", action="store_true", help="every overlay (needs --out-dir)")
    parser.add_argument(
        "--out-dir", metavar="DIR", help="write DIR/OVERLAY.yaml instead of printing"
    )
    parser.add_argument(
        "--kubernetes-version",
        default=KUBERNETES_VERSION,
        help=f"schema version to validate against (default {KUBERNETES_VERSION})",
    )
    parser.add_argument("--no-validate", action="store_true", help="skip schema validation")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl executable")
    return parser


def render_main(argv: list[str]) -> int:
    """`convstack k8s render`: exit 0, 1 when rendering or validation fails, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.all == bool(args.overlay):
        parser.error("name one OVERLAY, or give --all")
    if args.all and not args.out_dir:
        parser.error("--all writes one file per overlay: give --out-dir")
    try:
        names = overlay_names() if args.all else [args.overlay]
        for name in names:
            text = render_yaml(name, kubectl=args.kubectl)
            if not args.no_validate:
                objects = [d for d in yaml.safe_load_all(text) if d]
                validate(objects, args.kubernetes_version)
            _emit(name, text, args.out_dir)
    except UnknownOverlayError as exc:
        print(f"convstack k8s render: error: {exc}", file=sys.stderr)
        return 2
    except ManifestValidationError as exc:
        print(
            f"convstack k8s render: error: {len(exc.problems)} object(s) invalid for "
            f"Kubernetes {exc.kubernetes_version}:",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except (RenderError, ValueError) as exc:
        print(f"convstack k8s render: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _emit(overlay: str, text: str, out_dir: str | None) -> None:
    if out_dir is None:
        sys.stdout.write(text)
        return
    path = Path(out_dir) / f"{overlay}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    print(path)


if __name__ == "__main__":
    sys.exit(render_main(sys.argv[1:]))
