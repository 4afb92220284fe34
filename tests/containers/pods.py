"""A rendered pod template as `docker run` arguments (not a test module).

What the kubelet would do with the pod's security settings, volumes, environment and command,
spelled for Docker: `runAsUser`/`runAsGroup` as --user, `readOnlyRootFilesystem` as
--read-only, dropped capabilities as --cap-drop, `allowPrivilegeEscalation: false` as
no-new-privileges, an emptyDir as a tmpfs, a claim or ConfigMap as a bind mount of a host
directory, and the container's `command` + `args` as the entrypoint and its arguments. Resource
requests, probes and scheduling have no `docker run` equivalent and are left out. Pure: no
Docker is called here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from tests.k8s.manifests import container, one, pod_spec, volume

K8S_DIR = Path(__file__).resolve().parents[2] / "k8s"


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIRECTORY`, parsed."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True
    )
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def security_args(workload: dict, name: str) -> list[str]:
    """--user, --read-only, --cap-drop and --security-opt of the pod and its container."""
    pod = pod_spec(workload).get("securityContext", {})
    own = container(workload, name).get("securityContext", {})
    context = {**pod, **own}
    args = [f"--user={context['runAsUser']}:{context['runAsGroup']}"]
    if "fsGroup" in pod:
        args.append(f"--group-add={pod['fsGroup']}")
    if own.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    args += [f"--cap-drop={cap}" for cap in own.get("capabilities", {}).get("drop", [])]
    if own.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    return args


def volume_args(workload: dict, name: str, sources: dict[str, Path]) -> list[str]:
    """One --tmpfs or --mount per volumeMount. `sources` maps a claim or ConfigMap name to the
    host directory that stands for it; an emptyDir becomes a tmpfs (sizeLimit as its size)."""
    args = []
    for mount in container(workload, name).get("volumeMounts", []):
        spec = volume(workload, mount["name"])
        if "emptyDir" in spec:
            size = spec["emptyDir"].get("sizeLimit")
            options = "rw,exec,mode=1777" + (f",size={size.replace('Gi', 'g')}" if size else "")
            args.append(f"--tmpfs={mount['mountPath']}:{options}")
            continue
        if "persistentVolumeClaim" in spec:
            source = sources[spec["persistentVolumeClaim"]["claimName"]]
            read_only = mount.get("readOnly") or spec["persistentVolumeClaim"].get("readOnly")
        elif "configMap" in spec:
            source, read_only = sources[spec["configMap"]["name"]], True
        else:
            raise AssertionError(f"volume {mount['name']} has no docker equivalent here: {spec}")
        bind = f"--mount=type=bind,source={source},target={mount['mountPath']}"
        args.append(bind + (",readonly" if read_only else ""))
    return args


def env_args(workload: dict, name: str, field_values: dict[str, str]) -> list[str]:
    """-e for each env entry: its value, or for a fieldRef the value `field_values` gives for
    the variable (what the downward API would fill in)."""
    args = []
    for variable in container(workload, name).get("env", []):
        if "value" in variable:
            value = variable["value"]
        else:
            assert "fieldRef" in variable.get("valueFrom", {}), variable
            value = field_values[variable["name"]]
        args.append(f"--env={variable['name']}={value}")
    return args


def command_args(workload: dict, name: str, extra: list[str]) -> list[str]:
    """--entrypoint and the arguments after the image: the container's command and args, then
    `extra` flags."""
    spec = container(workload, name)
    command = spec["command"]
    return [f"--entrypoint={command[0]}", "IMAGE", *command[1:], *spec.get("args", []), *extra]


def run_args(
    workload: dict,
    name: str,
    image: str,
    *,
    sources: dict[str, Path],
    field_values: dict[str, str] | None = None,
    extra: list[str] = (),
) -> list[str]:
    """Everything after `docker run` (options, image, command) for the workload's container."""
    options = [
        *security_args(workload, name),
        *volume_args(workload, name, sources),
        *env_args(workload, name, field_values or {}),
    ]
    tail = command_args(workload, name, list(extra))
    image_at = tail.index("IMAGE")
    return [*options, *tail[:image_at], image, *tail[image_at + 1 :]]


def config_map_files(objects: list[dict], name: str, directory: Path) -> Path:
    """The rendered ConfigMap's files written into `directory` (what its volume shows)."""
    config_map = one(objects, "ConfigMap", name)
    directory.mkdir(parents=True, exist_ok=True)
    for filename, content in config_map["data"].items():
        (directory / filename).write_text(content)
    return directory


def config_map_named(objects: list[dict], prefix: str) -> str:
    """The name kustomize gave the ConfigMap generated as `prefix` (it may add a hash)."""
    names = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix)
    ]
    assert len(names) == 1, f"expected one ConfigMap {prefix}*, found {names}"
    return names[0]


def embedded_serving_objects(directory: Path) -> list[dict]:
    """The local overlay with the embedded-serving component, rendered by kustomize (it only
    takes paths relative to the kustomization)."""
    directory.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(K8S_DIR, directory)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {relative}/overlays/local\n"
        f"components:\n  - {relative}/components/embedded-serving\n"
    )
    return kustomize(directory)
