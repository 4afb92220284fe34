"""The Kubernetes API, as convstack uses it: the one module that imports the `kubernetes` client.

Objects go in and come out as plain dicts in the API's own JSON shape (camelCase, as in the
manifests), so the callers' logic works on rendered manifests and on API answers alike and
needs no generated model classes. Every failure becomes a `KubeError` subclass whose message is
one line naming the verb and the object, e.g.

    patch ConfigMap convstack/convstack-serving-config: conflict: the object has been modified ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from urllib.parse import quote, urlencode

import urllib3
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

__all__ = [
    "APPLY_FIELD_MANAGER",
    "KubeApi",
    "KubeConflictError",
    "KubeError",
    "KubeForbiddenError",
    "KubeInvalidError",
    "KubeNotFoundError",
    "KubeUnauthorizedError",
    "KubeUnreachableError",
    "describe_object",
]

# The field manager of everything convstack applies (server-side apply).
APPLY_FIELD_MANAGER = "convstack"
DEFAULT_REQUEST_TIMEOUT_S = 30.0
# kind -> (URL plural, namespaced). Only the kinds convstack creates or reads.
_RESOURCES: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False),
    "ConfigMap": ("configmaps", True),
    "Service": ("services", True),
    "PersistentVolumeClaim": ("persistentvolumeclaims", True),
    "Pod": ("pods", True),
    "Deployment": ("deployments", True),
    "Job": ("jobs", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "HorizontalPodAutoscaler": ("horizontalpodautoscalers", True),
    "ServiceAccount": ("serviceaccounts", True),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
}
_API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Pod": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}
_JSON = "application/json"
_MERGE_PATCH = "application/merge-patch+json"
_APPLY_PATCH = "application/apply-patch+yaml"


class KubeError(RuntimeError):
    """A Kubernetes API call failed; the message is one line naming the verb and the object.
    `status` is the HTTP status (0 when the API was not reached)."""

    status = 0


class KubeUnreachableError(KubeError):
    """No cluster: no configuration, or the API server did not answer."""


class KubeUnauthorizedError(KubeError):
    """401: the credentials were refused."""

    status = 401


class KubeForbiddenError(KubeError):
    """403: RBAC does not allow the verb on the object."""

    status = 403


class KubeNotFoundError(KubeError):
    """404: the object (or its namespace) does not exist."""

    status = 404


class KubeConflictError(KubeError):
    """409: a stale resourceVersion, an object that already exists, or an apply conflict."""

    status = 409


class KubeInvalidError(KubeError):
    """400/422: the API server rejected the object as invalid."""

    status = 422


_ERRORS_BY_STATUS: dict[int, tuple[type[KubeError], str]] = {
    400: (KubeInvalidError, "bad request"),
    401: (KubeUnauthorizedError, "unauthorized (check the kubeconfig's credentials)"),
    403: (KubeForbiddenError, "forbidden"),
    404: (KubeNotFoundError, "not found"),
    409: (KubeConflictError, "conflict"),
    422: (KubeInvalidError, "invalid"),
}


def describe_object(kind: str, namespace: str | None, name: str | None) -> str:
    """`Kind namespace/name` (or `Kind name` when cluster-scoped), for messages."""
    where = f"{namespace}/{name}" if namespace else (name or "")
    return f"{kind} {where}".strip()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _api_error(status: int, body: bytes, verb: str, what: str) -> KubeError:
    """The KubeError for an HTTP error answer; the API's Status message when there is one."""
    message = ""
    try:
        payload = json.loads(body or b"{}")
        if isinstance(payload, dict):
            message = payload.get("message") or ""
    except (ValueError, UnicodeDecodeError):
        message = body.decode("utf-8", "replace")[:300] if body else ""
    error_class, label = _ERRORS_BY_STATUS.get(status, (KubeError, f"HTTP {status}"))
    error = error_class(_one_line(f"{verb} {what}: {label}: {message or '(no message)'}"))
    error.status = status
    return error


class KubeApi:
    """The calls convstack makes, over one `kubernetes.client.ApiClient`."""

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.api_client = api_client
        self.request_timeout = request_timeout

    @classmethod
    def from_config(cls, kubeconfig: str | None = None, context: str | None = None) -> KubeApi:
        """Credentials from `kubeconfig` (else $KUBECONFIG or ~/.kube/config) or, inside a pod
        with neither, the pod's service account."""
        default_file = os.path.expanduser(k8s_config.KUBE_CONFIG_DEFAULT_LOCATION)
        source = kubeconfig or os.environ.get("KUBECONFIG") or default_file
        try:
            if kubeconfig or os.environ.get("KUBECONFIG") or os.path.exists(default_file):
                api_client = k8s_config.new_client_from_config(
                    config_file=kubeconfig, context=context
                )
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                configuration = k8s_client.Configuration()
                k8s_config.load_incluster_config(client_configuration=configuration)
                api_client = k8s_client.ApiClient(configuration)
            else:
                raise KubeUnreachableError(
                    f"no Kubernetes configuration: {default_file} does not exist, $KUBECONFIG "
                    "is not set and this is not a pod; point --kubeconfig at a cluster"
                )
        except (k8s_config.ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
            raise KubeUnreachableError(
                _one_line(f"cannot load the Kubernetes configuration {source}: {exc}")
            ) from exc
        return cls(api_client)

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    # -- generic verbs --------------------------------------------------------------------

    def get(self, kind: str, namespace: str | None, name: str) -> dict:
        """The object, as the API returns it."""
        path = self._path(kind, namespace, name)
        return self._json("GET", path, what=describe_object(kind, namespace, name), verb="get")

    def create(self, obj: dict, *, field_manager: str = APPLY_FIELD_MANAGER) -> dict:
        """POST a new object; KubeConflictError when one of that name exists."""
        kind, namespace, name = _identity(obj)
        path = self._path(kind, namespace, None)
        return self._json(
            "POST",
            path,
            body=obj,
            query={"fieldManager": field_manager},
            what=describe_object(kind, namespace, name),
            verb="create",
        )

    def apply(
        self, obj: dict, *, field_manager: str = APPLY_FIELD_MANAGER, force: bool = True
    ) -> dict:
        """Server-side apply: `obj` states every field `field_manager` owns; fields it owned
        before and leaves out are removed, fields other managers own are kept. `force` takes
        over fields another manager set to a different value instead of failing with 409."""
        kind, namespace, name = _identity(obj)
        query = {"fieldManager": field_manager}
        if force:
            query["force"] = "true"
        return self._json(
            "PATCH",
            self._path(kind, namespace, name),
            body=obj,
            query=query,
            content_type=_APPLY_PATCH,
            what=describe_object(kind, namespace, name),
            verb="apply",
        )

    def merge_patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict,
        *,
        field_manager: str = APPLY_FIELD_MANAGER,
    ) -> dict:
        """JSON merge patch (RFC 7386). A `metadata.resourceVersion` in `patch` is a
        precondition: the API answers 409 if the object has changed since."""
        return self._json(
            "PATCH",
            self._path(kind, namespace, name),
            body=patch,
            query={"fieldManager": field_manager},
            content_type=_MERGE_PATCH,
            what=describe_object(kind, namespace, name),
            verb="patch",
        )

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        """Delete the object and (in the background) what it owns, e.g. a Job's pods."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        self._json(
            "DELETE",
            self._path(kind, namespace, name),
            body=body,
            what=describe_object(kind, namespace, name),
            verb="delete",
        )

    def list(self, kind: str, namespace: str, label_selector: str | None = None) -> list[dict]:
        """The objects of `kind` in `namespace` matching `label_selector` (`k=v,k2=v2`)."""
        query = {"labelSelector": label_selector} if label_selector else None
        answer = self._json(
            "GET",
            self._path(kind, namespace, None),
            query=query,
            what=f"{_RESOURCES[kind][0]} in namespace {namespace}"
            + (f" with labels {label_selector}" if label_selector else ""),
            verb="list",
        )
        return list(answer.get("items") or [])

    # -- the calls the launcher and the config store make ---------------------------------

    def create_job(self, namespace: str, job: dict) -> dict:
        """Create a Job in `namespace` (overriding the manifest's namespace)."""
        job = {**job, "metadata": {**job["metadata"], "namespace": namespace}}
        return self.create(job)

    def get_job(self, namespace: str, name: str) -> dict:
        return self.get("Job", namespace, name)

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        return self.list("Pod", namespace, label_selector)

    def get_deployment(self, namespace: str, name: str) -> dict:
        return self.get("Deployment", namespace, name)

    def read_config_map(self, namespace: str, name: str) -> dict:
        """The ConfigMap: `data` and `metadata.resourceVersion` are what callers use."""
        return self.get("ConfigMap", namespace, name)

    def patch_config_map_data(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        resource_version: str,
        *,
        field_manager: str = APPLY_FIELD_MANAGER,
    ) -> dict:
        """Set the keys in `data` (others stay as they are) if the ConfigMap is still at
        `resource_version`; KubeConflictError if it changed since."""
        patch = {"metadata": {"resourceVersion": resource_version}, "data": data}
        return self.merge_patch("ConfigMap", namespace, name, patch, field_manager=field_manager)

    def follow_pod_log(
        self, namespace: str, pod: str, container: str, *, follow: bool = True
    ) -> Iterator[str]:
        """The container's log lines (without newlines) as they are written; with `follow` the
        iterator ends when the container exits."""
        what = f"log of {describe_object('Pod', namespace, pod)} container {container}"
        query = {"container": container, "follow": "true" if follow else "false"}
        path = self._path("Pod", namespace, pod) + "/log"
        # No read timeout: a training step may print nothing for a long time.
        response = self._request("GET", path, query=query, what=what, verb="read", stream=True)
        return _lines(response, what)

    # -- plumbing -------------------------------------------------------------------------

    def _path(self, kind: str, namespace: str | None, name: str | None) -> str:
        if kind not in _RESOURCES:
            raise KubeError(f"convstack does not handle objects of kind {kind!r}")
        plural, namespaced = _RESOURCES[kind]
        api_version = _API_VERSIONS[kind]
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if namespaced:
            if not namespace:
                raise KubeError(f"{kind} {name or ''}: no namespace given".replace("  ", " "))
            prefix += f"/namespaces/{quote(namespace, safe='')}"
        path = f"{prefix}/{plural}"
        return f"{path}/{quote(name, safe='')}" if name else path

    def _json(self, method: str, path: str, *, what: str, verb: str, **request) -> dict:
        """`_request`, and its answer read as JSON."""
        data = self._request(method, path, what=what, verb=verb, **request).read()
        try:
            return json.loads(data) if data else {}
        except ValueError as exc:
            raise KubeError(f"{verb} {what}: the API answered something not JSON") from exc

    def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        verb: str,
        body: dict | None = None,
        query: dict | None = None,
        content_type: str = _JSON,
        stream: bool = False,
    ):
        headers = {"Accept": _JSON}
        if body is not None:
            headers["Content-Type"] = content_type
        method_, url, headers, body, _ = self.api_client.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        if query:
            url += "?" + urlencode(query)
        timeout = (self.request_timeout, None) if stream else self.request_timeout
        try:
            response = self.api_client.call_api(
                method_, url, header_params=headers, body=body, _request_timeout=timeout
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeUnreachableError(
                _one_line(
                    f"{verb} {what}: cannot reach the Kubernetes API at {self.host}: "
                    f"{_root_cause(exc)}"
                )
            ) from exc
        except k8s_client.ApiException as exc:  # raised for TLS failures
            raise KubeUnreachableError(
                _one_line(
                    f"{verb} {what}: cannot talk to the Kubernetes API at {self.host}: {exc.reason}"
                )
            ) from exc
        if not 200 <= response.status <= 299:
            raise _api_error(response.status, response.read(), verb, what)
        return response


def _identity(obj: dict) -> tuple[str, str | None, str]:
    kind = obj.get("kind")
    metadata = obj.get("metadata") or {}
    if not kind or not metadata.get("name"):
        raise KubeError(f"not a Kubernetes object (needs kind and metadata.name): {obj!r:.120}")
    if obj.get("apiVersion") != _API_VERSIONS.get(kind, obj.get("apiVersion")):
        raise KubeError(
            f"{kind} {metadata['name']}: apiVersion {obj.get('apiVersion')!r} is not the one "
            f"convstack speaks ({_API_VERSIONS[kind]})"
        )
    return kind, metadata.get("namespace"), metadata["name"]


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a urllib3 retry chain ("connection refused", a timeout)."""
    reason = getattr(exc, "reason", None)
    while isinstance(reason, BaseException) and getattr(reason, "reason", None) is not None:
        reason = reason.reason
    cause = reason if isinstance(reason, BaseException) else exc
    text = str(cause)
    # urllib3 prefixes the connection object's repr: keep what the OS said.
    return text.split(": ", 1)[1] if text.startswith("<") and ": " in text else text


def _lines(response, what: str) -> Iterator[str]:
    """Decode a streamed response into lines; a dropped connection ends the stream with a
    KubeUnreachableError."""
    pending = b""
    raw = response.response
    try:
        for chunk in raw.stream(4096, decode_content=True):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KubeUnreachableError(
            _one_line(f"read {what}: the stream broke off: {_root_cause(exc)}")
        ) from exc
    finally:
        raw.release_conn()
