"""The layout: one `convstack.*` import namespace over the top-level folders, and imports that
only run down (walked with ast over every module, lazy imports inside functions included)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]

# Each room and the rooms it may import, top to bottom. A module's room is the longest name
# below that prefixes it. Rooms import themselves freely; anything not convstack is free.
ALLOWED_IMPORTS: dict[str, tuple[str, ...]] = {
    # The entry point dispatches to every command (by name, so it imports none of them).
    "convstack.cli": ("convstack",),
    "convstack.demo": (
        "convstack.common",
        "convstack.trainer",
        "convstack.client",
        "convstack.serving",
    ),
    "convstack.bench": (
        "convstack.common",
        "convstack.trainer",
        "convstack.client",
        "convstack.serving",
    ),
    # The launcher starts rollouts as Jobs and deploys the store they edit.
    "convstack.k8s": (
        "convstack.common",
        "convstack.trainer",
        "convstack.serving.rollout",
    ),
    # Rollouts edit the config servers poll, watch them through the client and read the golden
    # set with the trainer's dataset code.
    "convstack.serving.rollout": (
        "convstack.common",
        "convstack.trainer",
        "convstack.client",
        "convstack.serving",
    ),
    # The server may use the client's tensor codec, and nothing else of it.
    "convstack.serving": ("convstack.common", "convstack.client.tensors"),
    "convstack.client": ("convstack.common",),
    "convstack.trainer": ("convstack.common",),
    "convstack.common": (),
    "convstack": (),
}
# Below a room, what it may not import even where a wider rule allows it.
FORBIDDEN_BELOW: dict[str, tuple[str, ...]] = {"convstack.serving": ("convstack.serving.rollout",)}
COMMAND = "convstack.cli"


@dataclass(frozen=True)
class ImportEdge:
    importer: str
    imported: str
    where: str  # path:line


def package_dirs() -> dict[str, Path]:
    """`convstack...` package -> its folder, as pyproject.toml maps them."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {package: REPO_ROOT / folder for package, folder in mapping.items()}


def module_files() -> dict[str, Path]:
    """Every module of the distribution, by its import name."""
    modules: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            # A mapped sub-package wins over the folder of its parent (convstack/ holds no
            # trainer/, but be strict about it).
            modules.setdefault(name, path)
    return modules


def import_edges(name: str, path: Path, known: set[str]) -> list[ImportEdge]:
    """The convstack modules that module `name` imports, wherever in the file."""
    edges = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                targets.append(submodule if submodule in known else node.module)
        for target in targets:
            if target == "convstack" or target.startswith("convstack."):
                edges.append(ImportEdge(name, target, f"{_shown(path)}:{node.lineno}"))
    return edges


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def room_of(module: str) -> str:
    return max((room for room in ALLOWED_IMPORTS if _within(module, room)), key=len)


def forbidden(edge: ImportEdge) -> str | None:
    """Why `edge` runs the wrong way, or None when it is allowed."""
    if edge.imported == COMMAND or _within(edge.imported, COMMAND + "."):
        return "only the entry point uses the command package"
    source = room_of(edge.importer)
    if source == COMMAND:
        return None
    if room_of(edge.imported) == source:
        return None
    for below in FORBIDDEN_BELOW.get(source, ()):
        if _within(edge.imported, below):
            return f"{source} sits below {below}"
    if any(_within(edge.imported, allowed) for allowed in ALLOWED_IMPORTS[source]):
        return None
    return f"{source} may import only {', '.join(ALLOWED_IMPORTS[source]) or 'no other part'}"


def layout_violations(modules: dict[str, Path]) -> list[str]:
    known = set(modules)
    found = []
    for name, path in sorted(modules.items()):
        for edge in import_edges(name, path, known):
            reason = forbidden(edge)
            if reason:
                found.append(f"{edge.where}: {edge.importer} imports {edge.imported}: {reason}")
    return found


def test_every_import_runs_down():
    assert layout_violations(module_files()) == []


def test_every_module_is_in_a_room_and_every_room_exists():
    modules = module_files()
    assert {room_of(name) for name in modules} == set(ALLOWED_IMPORTS)


@pytest.mark.parametrize(
    ("importer", "imported", "reason"),
    [
        ("convstack.trainer.run", "convstack.serving.model_config", "convstack.trainer may"),
        ("convstack.trainer.run", "convstack.client.tensors", "convstack.trainer may"),
        ("convstack.client.cli", "convstack.serving.errors", "convstack.client may"),
        ("convstack.client.cli", "convstack.trainer.data", "convstack.client may"),
        ("convstack.serving.manager", "convstack.serving.rollout.plan", "sits below"),
        ("convstack.serving.grpc_api", "convstack.client.sync_client", "convstack.serving may"),
        ("convstack.serving.rollout.store", "convstack.k8s.deploy", "rollout may"),
        ("convstack.common.files", "convstack.trainer.errors", "no other part"),
        ("convstack.k8s.launch", "convstack.cli", "only the entry point"),
        ("convstack.serving.server", "convstack.demo.serve", "convstack.serving may"),
    ],
)
def test_a_forbidden_import_is_caught(importer, imported, reason):
    assert reason in (forbidden(ImportEdge(importer, imported, "x.py:1")) or "")


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("convstack.serving.grpc_api", "convstack.client.tensors"),
        ("convstack.serving.rollout.watch", "convstack.client.sync_client"),
        ("convstack.serving.rollout.configmap_store", "convstack.common.kube_api"),
        ("convstack.k8s.deploy", "convstack.serving.rollout.store"),
        ("convstack.trainer.export", "convstack.common.files"),
        ("convstack.cli", "convstack.serving.cli"),
    ],
)
def test_a_downward_import_is_allowed(importer, imported):
    assert forbidden(ImportEdge(importer, imported, "x.py:1")) is None


def test_an_added_upward_import_fails_the_walk(tmp_path):
    """The walk over real files finds a lazy import inside a function, too."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from convstack.serving import model_config\n")
    modules = {**module_files(), "convstack.trainer.planted": planted}

    found = layout_violations(modules)

    assert found == [
        f"{planted}:2: convstack.trainer.planted imports convstack.serving.model_config: "
        "convstack.trainer may import only convstack.common"
    ]


# --- a real install --------------------------------------------------------------------------

PROBE = """
import importlib.util, json, sys
names = sys.argv[1:]
print(json.dumps({name: importlib.util.find_spec(name) is not None for name in names}))
"""
TOP_LEVEL = ["trainer", "serving", "client"]
NAMESPACED = [
    "convstack.cli",
    "convstack.common.files",
    "convstack.trainer.export",
    "convstack.serving.server",
    "convstack.serving.rollout.plan",
    "convstack.client.sync_client",
    "convstack.k8s.launch",
]


def _source_copy(destination: Path) -> Path:
    """What a wheel is built from: pyproject, README and the package folders."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, destination / name)
    for folder in {path.relative_to(REPO_ROOT).parts[0] for path in package_dirs().values()}:
        shutil.copytree(
            REPO_ROOT / folder, destination / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    return destination


def _probe(python: Path, cwd: Path) -> dict[str, bool]:
    import json

    result = subprocess.run(
        [str(python), "-c", PROBE, *TOP_LEVEL, *NAMESPACED],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-editable"])
def test_a_fresh_install_has_one_namespace(tmp_path, editable):
    source = _source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The outer pip installs into the new venv (no dependencies: the names are what is tested).
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    install += ["--no-deps", *(["-e"] if editable else []), str(source)]
    subprocess.run(install, check=True, capture_output=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    found = _probe(python, elsewhere)

    assert {name: found[name] for name in TOP_LEVEL} == dict.fromkeys(TOP_LEVEL, False)
    assert {name: found[name] for name in NAMESPACED} == dict.fromkeys(NAMESPACED, True)
