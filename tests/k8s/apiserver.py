"""A stand-in for the Kubernetes API server, for tests at the client boundary.

A real HTTP server on loopback (aiohttp in a thread) that the real `kubernetes` Python client
talks to, through a real kubeconfig. It implements only the endpoints convstack uses, with the
API server's semantics where they matter to convstack:

- objects get uid, creationTimestamp, generation and a cluster-wide increasing resourceVersion;
  a merge patch carrying a stale `metadata.resourceVersion` is refused with 409;
- create answers 409 when the name exists, 404 when the namespace does not; get/patch 404;
- server-side apply (application/apply-patch+yaml) merges by field manager: a manager's fields
  that it leaves out are removed unless another manager also owns them; a field another manager
  set to a different value is a 409 conflict unless `force=true`; `metadata.managedFields` is
  reported in the FieldsV1 format (lists are owned as a whole);
- label selectors (`k=v`, `k!=v`, `k`, `!k`) on lists; 403 and 401 on request;
- a Job controller that follows the Job's own `podFailurePolicy` and `backoffLimit`, creating
  pods whose fate the test scripts (`PodRun`: log lines, exit code, OOMKilled, disruption), and a
  Deployment controller that rolls out in steps (or gets stuck);
- pod logs, streamed (`follow=true`) while the scripted container "runs".

Every object body the server receives (create, apply, and the result of every merge patch) is
validated strictly against the Kubernetes schema of `convstack.k8s.render.KUBERNETES_VERSION`
with `kubernetes_validate`: an invalid one is refused with 422 and recorded in `invalid`, which
the fixtures assert to be empty at teardown.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import kubernetes_validate
import yaml
from aiohttp import web

from convstack.k8s.render import KUBERNETES_VERSION, describe

# URL plural -> (kind, apiVersion, namespaced)
RESOURCES = {
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "configmaps"): ("ConfigMap", True),
    ("", "v1", "services"): ("Service", True),
    ("", "v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True),
    ("", "v1", "pods"): ("Pod", True),
    ("apps", "v1", "deployments"): ("Deployment", True),
    ("batch", "v1", "jobs"): ("Job", True),
    ("policy", "v1", "poddisruptionbudgets"): ("PodDisruptionBudget", True),
    ("autoscaling", "v2", "horizontalpodautoscalers"): ("HorizontalPodAutoscaler", True),
    ("", "v1", "serviceaccounts"): ("ServiceAccount", True),
    ("rbac.authorization.k8s.io", "v1", "roles"): ("Role", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"): ("RoleBinding", True),
}
_PATH = re.compile(
    r"^/(?:api/(?P<core_version>v1)|apis/(?P<group>[a-z0-9.]+)/(?P<version>v[0-9a-z]+))"
    r"(?:/namespaces/(?P<namespace>[^/]+)(?=/))?"
    r"/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>log))?$"
)
# Metadata the server owns; never part of a manager's field set.
_SERVER_METADATA = {
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "managedFields",
    "name",
    "namespace",
}
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiFailure(Exception):
    """An error answer: HTTP status, reason and message as a metav1.Status."""

    def __init__(self, code: int, reason: str, message: str, **details) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


@dataclass
class PodRun:
    """What one pod of a scripted Job does once its container starts: print `logs`, then exit
    with `exit_code` (`reason` as the kubelet reports it: Completed, Error, OOMKilled). With
    `disruption` (e.g. "PreemptionByScheduler") the pod also gets the DisruptionTarget
    condition. `deadline_after` makes the Job controller then fail the Job with
    DeadlineExceeded. `pending` keeps the pod Pending forever."""

    logs: list[str] = field(default_factory=list)
    exit_code: int = 0
    reason: str | None = None
    disruption: str | None = None
    deadline_after: bool = False
    pending: bool = False

    def kubelet_reason(self) -> str:
        if self.reason:
            return self.reason
        return "Completed" if self.exit_code == 0 else "Error"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: object


@dataclass
class _Pod:
    obj: dict
    run: PodRun
    seen_pending: bool = False
    streamed: bool = False


class FakeApiServer:
    """The stand-in; use as a context manager. `url`, `write_kubeconfig(path)`, and helpers to
    seed objects, script Jobs, inject failures and inspect what was sent."""

    def __init__(self, *, token: str = "stand-in-token") -> None:
        self.token = token
        self.objects: dict[tuple[str, str, str], dict] = {}
        # (kind, namespace, name) -> manager -> (operation, set of field paths)
        self.owners: dict[tuple[str, str, str], dict[str, tuple[str, set[tuple]]]] = {}
        self.requests: list[Request] = []
        self.invalid: list[str] = []
        self.errors: list[str] = []
        self.denied: set[tuple[str, str]] = set()
        self.job_scripts: list[list[PodRun]] = []
        self.deployment_mode = "progress"  # or "stuck"
        self.before_write: Callable[[str, str, str, str], None] | None = None
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._runs: dict[tuple[str, str], list[PodRun]] = {}
        self._versions = itertools.count(1000)
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> FakeApiServer:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-apiserver", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the stand-in API server did not start")
        return self

    def __exit__(self, *exc) -> None:
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, *, token: str | None = None) -> Path:
        """A kubeconfig for this server (bearer `token`, by default the right one)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token or self.token}}],
            "contexts": [
                {"name": "stand-in", "context": {"cluster": "stand-in", "user": "tester"}}
            ],
            "current-context": "stand-in",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- test helpers ---------------------------------------------------------------------

    def seed(self, obj: dict, manager: str = "seed") -> dict:
        """Store `obj` as if created by `manager` (its namespace too, when missing)."""
        with self._lock:
            namespace = obj["metadata"].get("namespace")
            if namespace and ("Namespace", "", namespace) not in self.objects:
                self._create(
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                    manager,
                )
            return copy.deepcopy(self._create(copy.deepcopy(obj), manager))

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            found = self.objects.get((kind, namespace or "", name))
            return copy.deepcopy(found)

    def of_kind(self, kind: str) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(o) for (k, _, _), o in self.objects.items() if k == kind]

    def edit(
        self,
        kind: str,
        namespace: str,
        name: str,
        change: Callable[[dict], None],
        manager: str = "someone-else",
    ) -> dict:
        """A concurrent writer: apply `change` to the stored object, as an update by
        `manager` (the resourceVersion moves on)."""
        with self._lock:
            key = (kind, namespace, name)
            before = copy.deepcopy(self.objects[key])
            after = copy.deepcopy(before)
            change(after)
            self._record_update(key, manager, before, after)
            return copy.deepcopy(self._store(key, after))

    def deny(self, verb: str, plural: str) -> None:
        """Answer 403 to `verb` (get, list, create, patch, delete) on `plural` from now on."""
        self.denied.add((verb, plural))

    def script_job(self, *runs: PodRun) -> None:
        """The next Job created runs its index-0 (or only) pod as `runs[0]`, its replacements
        as `runs[1]`, ...; the other indexes of an Indexed Job succeed with the chief."""
        self.job_scripts.append(list(runs))

    def sent(self, method: str | None = None, path_part: str = "") -> list[Request]:
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and path_part in r.path
            ]

    def managers(self, kind: str, namespace: str, name: str) -> dict[str, set[tuple]]:
        """manager -> the field paths it owns."""
        with self._lock:
            owned = self.owners.get((kind, namespace or "", name), {})
            return {m: set(paths) for m, (_, paths) in owned.items()}

    # -- HTTP -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body_bytes = await request.read()
        try:
            body = json.loads(body_bytes) if body_bytes else None
        except ValueError:
            body = yaml.safe_load(body_bytes)
        record = Request(
            request.method, request.path, dict(request.query), request.content_type, body
        )
        with self._lock:
            self.requests.append(record)
        try:
            return await self._answer(request, record)
        except Exception as exc:  # a bug in the stand-in: fail the test, not just the request
            self.errors.append(f"{request.method} {request.path}: {exc!r}")
            raise

    async def _answer(self, request: web.Request, record: Request) -> web.StreamResponse:
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiFailure(401, "Unauthorized", "Unauthorized")
            route = self._route(request.path)
            if route["sub"] == "log":
                return await self._log(request, route)
            with self._lock:
                status, answer = self._dispatch(request.method, route, record)
        except ApiFailure as failure:
            return web.json_response(failure.status(), status=failure.code)
        return web.json_response(answer, status=status)

    def _route(self, path: str) -> dict:
        match = _PATH.match(path)
        if not match:
            raise ApiFailure(
                404, "NotFound", f"the server could not find the requested resource ({path})"
            )
        group = match["group"] or ""
        version = match["core_version"] or match["version"]
        key = (group, version, match["plural"])
        if key not in RESOURCES:
            raise ApiFailure(
                404, "NotFound", f"the server could not find the requested resource ({path})"
            )
        kind, namespaced = RESOURCES[key]
        api_version = f"{group}/{version}" if group else version
        return {
            "kind": kind,
            "api_version": api_version,
            "plural": match["plural"],
            "group": group,
            "namespace": match["namespace"] or "",
            "name": match["name"],
            "sub": match["sub"],
            "namespaced": namespaced,
        }

    def _dispatch(self, method: str, route: dict, request: Request) -> tuple[int, dict]:
        verb = {
            ("GET", False): "list",
            ("GET", True): "get",
            ("POST", False): "create",
            ("PATCH", True): "patch",
            ("PUT", True): "update",
            ("DELETE", True): "delete",
        }.get((method, bool(route["name"])))
        if verb is None:
            raise ApiFailure(405, "MethodNotAllowed", f"{method} is not supported here")
        self._authorize(verb, route)
        key = (route["kind"], route["namespace"], route["name"] or "")
        if verb == "get":
            self._advance_on_read(key)
            return 200, self._existing(key, route)
        if verb == "list":
            return 200, self._list(route, request.query.get("labelSelector", ""))
        if verb == "create":
            return 201, self._create_request(route, request)
        if verb == "patch":
            return self._patch_request(key, route, request)
        if verb == "delete":
            self._existing(key, route)
            self._delete(key)
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        raise ApiFailure(405, "MethodNotAllowed", f"{method} is not supported here")

    def _authorize(self, verb: str, route: dict) -> None:
        if (verb, route["plural"]) in self.denied:
            name = f' "{route["name"]}"' if route["name"] else ""
            where = f' in the namespace "{route["namespace"]}"' if route["namespace"] else ""
            raise ApiFailure(
                403,
                "Forbidden",
                f'{route["plural"]}{name} is forbidden: User "tester" cannot {verb} resource '
                f'"{route["plural"]}" in API group "{route["group"]}"{where}',
            )

    def _existing(self, key: tuple, route: dict) -> dict:
        found = self.objects.get(key)
        if found is None:
            resource = route["plural"] + (f".{route['group']}" if route["group"] else "")
            raise ApiFailure(
                404,
                "NotFound",
                f'{resource} "{key[2]}" not found',
                name=key[2],
                kind=route["plural"],
            )
        return copy.deepcopy(found)

    def _list(self, route: dict, selector: str) -> dict:
        matching = [
            obj
            for (kind, namespace, _), obj in sorted(self.objects.items())
            if kind == route["kind"]
            and (not route["namespace"] or namespace == route["namespace"])
            and _selects(selector, obj["metadata"].get("labels") or {})
        ]
        if route["kind"] == "Pod":
            self._kubelet_on_list(matching)
        items = [copy.deepcopy(obj) for obj in matching]  # pods: as the kubelet left them
        return {
            "kind": f"{route['kind']}List",
            "apiVersion": route["api_version"],
            "metadata": {"resourceVersion": str(next(self._versions))},
            "items": items,
        }

    # -- writes ---------------------------------------------------------------------------

    def _check_body(self, route: dict, body: object, name: str | None) -> dict:
        if not isinstance(body, dict):
            raise ApiFailure(400, "BadRequest", "the request body is not an object")
        if body.get("kind") != route["kind"] or body.get("apiVersion") != route["api_version"]:
            raise ApiFailure(
                400,
                "BadRequest",
                f"the body is {body.get('apiVersion')}/{body.get('kind')}, the URL names "
                f"{route['api_version']}/{route['kind']}",
            )
        metadata = body.get("metadata") or {}
        if name is not None and metadata.get("name") != name:
            raise ApiFailure(400, "BadRequest", "the name of the object does not match the URL")
        if (
            route["namespaced"]
            and metadata.get("namespace", route["namespace"]) != route["namespace"]
        ):
            raise ApiFailure(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        self._validate(body)
        return body

    def _validate(self, obj: dict) -> None:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.absolute_path) or "<top level>"
            problem = f"{describe(obj)}: {where}: {exc.message}"
            self.invalid.append(problem)
            raise ApiFailure(422, "Invalid", problem) from exc
        except kubernetes_validate.SchemaNotFoundError as exc:
            self.invalid.append(f"{describe(obj)}: {exc.message}")
            raise ApiFailure(422, "Invalid", exc.message) from exc

    def _create_request(self, route: dict, request: Request) -> dict:
        body = copy.deepcopy(self._check_body(route, request.body, None))
        if route["namespaced"]:
            body["metadata"].setdefault("namespace", route["namespace"])
        manager = request.query.get("fieldManager", "unknown")
        self._notify("create", route["kind"], route["namespace"], body["metadata"]["name"])
        return copy.deepcopy(self._create(body, manager))

    def _create(self, obj: dict, manager: str) -> dict:
        kind, metadata = obj["kind"], obj["metadata"]
        namespace = metadata.get("namespace", "")
        key = (kind, namespace, metadata["name"])
        if namespace and ("Namespace", "", namespace) not in self.objects:
            raise ApiFailure(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                name=namespace,
                kind="namespaces",
            )
        if key in self.objects:
            raise ApiFailure(
                409,
                "AlreadyExists",
                f'{kind.lower()}s "{metadata["name"]}" already exists',
                name=metadata["name"],
            )
        obj.pop("status", None)
        metadata.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        self._defaults(obj)
        self.owners[key] = {manager: ("Update", _field_paths(obj))}
        stored = self._store(key, obj)
        if kind == "Job":
            self._start_job(key)
        return self.objects[key] if kind == "Job" else stored

    def _patch_request(self, key: tuple, route: dict, request: Request) -> tuple[int, dict]:
        manager = request.query.get("fieldManager")
        if request.content_type == "application/apply-patch+yaml":
            if not manager:
                raise ApiFailure(400, "BadRequest", "fieldManager is required for apply patches")
            body = copy.deepcopy(self._check_body(route, request.body, route["name"]))
            if route["namespaced"]:
                body["metadata"].setdefault("namespace", route["namespace"])
            self._notify("apply", *key)
            created = key not in self.objects
            result = self._apply(
                key, copy.deepcopy(body), manager, request.query.get("force") == "true"
            )
            return (201 if created else 200), result
        if request.content_type == "application/merge-patch+json":
            before = self._existing(key, route)
            patch = request.body if isinstance(request.body, dict) else {}
            expected = (patch.get("metadata") or {}).get("resourceVersion")
            self._notify("patch", *key)
            before = self._existing(key, route)  # the notification may have changed it
            if expected is not None and expected != before["metadata"]["resourceVersion"]:
                raise ApiFailure(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {route["plural"]} "{key[2]}": the object '
                    "has been modified; please apply your changes to the latest version and try "
                    "again",
                )
            after = _merge_patch(before, patch)
            after["metadata"]["resourceVersion"] = before["metadata"]["resourceVersion"]
            self._validate(after)
            self._record_update(key, manager or "unknown", before, after)
            return 200, copy.deepcopy(self._store(key, after))
        raise ApiFailure(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format: {request.content_type}",
        )

    def _apply(self, key: tuple, body: dict, manager: str, force: bool) -> dict:
        applied = _field_paths(body)
        if key not in self.objects:
            self._create(body, manager)
            self.owners[key] = {manager: ("Apply", applied)}
            return copy.deepcopy(self._store(key, self.objects[key]))
        before = copy.deepcopy(self.objects[key])
        owners = self.owners.setdefault(key, {})
        conflicts = sorted(
            (other, path)
            for other, (_, paths) in owners.items()
            if other != manager
            for path in paths & applied
            if _get_path(before, path) != _get_path(body, path)
        )
        if conflicts and not force:
            described = "; ".join(f'conflict with "{m}": .{".".join(p)}' for m, p in conflicts)
            raise ApiFailure(
                409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s): {described}"
            )
        after = copy.deepcopy(before)
        previously = owners.get(manager, ("Apply", set()))[1]
        others = set().union(*(p for m, (_, p) in owners.items() if m != manager))
        for path in previously - applied - others:
            _delete_path(after, path)
        for path in applied:
            _set_path(after, path, _get_path(body, path))
        for other in list(owners):
            if other != manager:
                changed = {
                    p
                    for p in owners[other][1] & applied
                    if _get_path(before, p) != _get_path(body, p)
                }
                owners[other] = (owners[other][0], owners[other][1] - changed)
        owners[manager] = ("Apply", applied)
        if after.get("spec") != before.get("spec"):
            after["metadata"]["generation"] = before["metadata"].get("generation", 1) + 1
        self._validate(after)
        return copy.deepcopy(self._store(key, after))

    def _record_update(self, key: tuple, manager: str, before: dict, after: dict) -> None:
        owners = self.owners.setdefault(key, {})
        changed = {
            p
            for p in _field_paths(after) | _field_paths(before)
            if _get_path(before, p) != _get_path(after, p)
        }
        for other in list(owners):
            owners[other] = (owners[other][0], owners[other][1] - changed)
        _, paths = owners.get(manager, ("Update", set()))
        owners[manager] = ("Update", (paths | changed) & _field_paths(after))
        if after.get("spec") != before.get("spec"):
            after["metadata"]["generation"] = before["metadata"].get("generation", 1) + 1

    def _store(self, key: tuple, obj: dict) -> dict:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        obj["metadata"]["managedFields"] = [
            {
                "manager": manager,
                "operation": operation,
                "apiVersion": obj["apiVersion"],
                "time": now(),
                "fieldsType": "FieldsV1",
                "fieldsV1": _fields_v1(paths),
            }
            for manager, (operation, paths) in sorted(self.owners.get(key, {}).items())
            if paths
        ]
        self.objects[key] = obj
        return obj

    def _delete(self, key: tuple) -> None:
        del self.objects[key]
        self.owners.pop(key, None)
        if key[0] == "Job":
            for pod_key in [
                k
                for k, p in self._pods.items()
                if p.obj["metadata"]["labels"].get(JOB_NAME_LABEL) == key[2]
            ]:
                self._pods.pop(pod_key)
                self.objects.pop(("Pod", *pod_key), None)

    def _notify(self, verb: str, kind: str, namespace: str, name: str) -> None:
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None  # once: a concurrent writer
            hook(verb, kind, namespace, name)

    def _defaults(self, obj: dict) -> None:
        """The API server's defaulting that convstack relies on."""
        if obj["kind"] == "Deployment":
            obj["spec"].setdefault("replicas", 1)
        if obj["kind"] == "Job":
            uid = obj["metadata"]["uid"]
            labels = {
                "batch.kubernetes.io/controller-uid": uid,
                JOB_NAME_LABEL: obj["metadata"]["name"],
                "controller-uid": uid,
                "job-name": obj["metadata"]["name"],
            }
            obj["spec"].setdefault(
                "selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            )
            template = obj["spec"]["template"].setdefault("metadata", {})
            template["labels"] = {**template.get("labels", {}), **labels}

    # -- the Deployment controller --------------------------------------------------------

    def _advance_on_read(self, key: tuple) -> None:
        if key[0] != "Deployment" or key not in self.objects:
            return
        obj = copy.deepcopy(self.objects[key])
        generation = obj["metadata"]["generation"]
        status = obj.setdefault("status", {})
        replicas = obj["spec"].get("replicas", 1)
        if status.get("observedGeneration") != generation:
            status.update(
                observedGeneration=generation,
                replicas=replicas,
                updatedReplicas=replicas,
                readyReplicas=0,
                availableReplicas=0,
                unavailableReplicas=replicas,
                conditions=[
                    _condition(
                        "Progressing", "True", "ReplicaSetUpdated", "ReplicaSet is progressing."
                    )
                ],
            )
        elif self.deployment_mode == "stuck":
            status["conditions"] = [
                _condition(
                    "Available",
                    "False",
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.",
                ),
                _condition(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    f'ReplicaSet "{key[2]}-6d4cf56db6" has timed out progressing.',
                ),
            ]
        else:
            status.update(readyReplicas=replicas, availableReplicas=replicas, unavailableReplicas=0)
            status["conditions"] = [
                _condition(
                    "Available",
                    "True",
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.",
                ),
                _condition(
                    "Progressing",
                    "True",
                    "NewReplicaSetAvailable",
                    f'ReplicaSet "{key[2]}-6d4cf56db6" has successfully progressed.',
                ),
            ]
        self.objects[key] = obj

    # -- the Job controller and the kubelet -----------------------------------------------

    def _start_job(self, key: tuple) -> None:
        job = self.objects[key]
        runs = self.job_scripts.pop(0) if self.job_scripts else [PodRun(pending=True)]
        self._runs[key[1:]] = runs
        indexed = job["spec"].get("completionMode") == "Indexed"
        count = job["spec"].get("parallelism", 1) if indexed else 1
        job["status"] = {"startTime": now(), "active": count, "ready": 0, "terminating": 0}
        for index in range(count):
            run = runs.pop(0) if index == 0 and runs else PodRun(pending=index == 0)
            self._new_pod(key, index if indexed else None, run)

    def _new_pod(self, job_key: tuple, index: int | None, run: PodRun) -> None:
        job = self.objects[job_key]
        template = copy.deepcopy(job["spec"]["template"])
        suffix = uuid.uuid4().hex[:5]
        name = f"{job_key[2]}-{index}-{suffix}" if index is not None else f"{job_key[2]}-{suffix}"
        metadata = {
            "name": name,
            "namespace": job_key[1],
            "labels": dict(template["metadata"].get("labels", {})),
            "annotations": dict(template["metadata"].get("annotations", {})),
            "uid": str(uuid.uuid4()),
            "creationTimestamp": now(),
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job_key[2],
                    "uid": job["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        }
        spec = template["spec"]
        if index is not None:
            metadata["labels"][INDEX_LABEL] = str(index)
            metadata["annotations"][INDEX_ANNOTATION] = str(index)
            spec["hostname"] = f"{job_key[2]}-{index}"
        container = spec["containers"][0]["name"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": spec,
            "status": {
                "phase": "Pending",
                "conditions": [_condition("PodScheduled", "True")],
                "containerStatuses": [
                    _container_status(container, {"waiting": {"reason": "ContainerCreating"}})
                ],
            },
        }
        self._pods[(job_key[1], name)] = _Pod(pod, run)
        self._store(("Pod", job_key[1], name), pod)

    def _kubelet_on_list(self, items: list[dict]) -> None:
        """A pod seen Pending once is Running at the next look (unless scripted to stay)."""
        for item in items:
            pod = self._pods.get((item["metadata"]["namespace"], item["metadata"]["name"]))
            if pod is None or pod.obj["status"]["phase"] != "Pending" or pod.run.pending:
                continue
            if pod.seen_pending:
                self._set_running(pod)
            pod.seen_pending = True

    def _set_running(self, pod: _Pod) -> None:
        container = pod.obj["spec"]["containers"][0]["name"]
        pod.obj["status"] = {
            "phase": "Running",
            "startTime": now(),
            "conditions": [_condition("PodScheduled", "True"), _condition("Ready", "True")],
            "containerStatuses": [
                _container_status(container, {"running": {"startedAt": now()}}, ready=True)
            ],
        }
        self._store(("Pod", pod.obj["metadata"]["namespace"], pod.obj["metadata"]["name"]), pod.obj)

    async def _log(self, request: web.Request, route: dict) -> web.StreamResponse:
        key = (route["namespace"], route["name"])
        with self._lock:
            self._authorize("get", {**route, "plural": "pods/log"})
            pod = self._pods.get(key)
            if pod is None:
                raise ApiFailure(404, "NotFound", f'pods "{route["name"]}" not found')
            container = request.query.get("container", "")
            names = [c["name"] for c in pod.obj["spec"]["containers"]]
            if container not in names:
                raise ApiFailure(
                    400, "BadRequest", f"container {container} is not valid for pod {route['name']}"
                )
            phase = pod.obj["status"]["phase"]
            if phase == "Pending":
                raise ApiFailure(
                    400,
                    "BadRequest",
                    f'container "{container}" in pod "{route["name"]}" is waiting to start: '
                    "ContainerCreating",
                )
            first_stream = phase == "Running" and not pod.streamed
            pod.streamed = True
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for line in pod.run.logs:
            await response.write((line + "\n").encode())
            await asyncio.sleep(0)
        if first_stream and request.query.get("follow") == "true":
            with self._lock:
                self._terminate(key)
        await response.write_eof()
        return response

    def _terminate(self, pod_key: tuple) -> None:
        """The scripted container exits; the Job controller reacts."""
        pod = self._pods[pod_key]
        run = pod.run
        container = pod.obj["spec"]["containers"][0]["name"]
        terminated = {
            "exitCode": run.exit_code,
            "reason": run.kubelet_reason(),
            "startedAt": now(),
            "finishedAt": now(),
        }
        conditions = [_condition("PodScheduled", "True"), _condition("Ready", "False")]
        if run.disruption:
            conditions.append(
                _condition(
                    "DisruptionTarget",
                    "True",
                    run.disruption,
                    "Kubernetes Scheduler: PodPreemption",
                )
            )
        pod.obj["status"] = {
            "phase": "Succeeded" if run.exit_code == 0 else "Failed",
            "startTime": now(),
            "conditions": conditions,
            "containerStatuses": [_container_status(container, {"terminated": terminated})],
        }
        self._store(("Pod", *pod_key), pod.obj)
        job_name = pod.obj["metadata"]["labels"][JOB_NAME_LABEL]
        self._job_controller((pod_key[0], job_name), pod)

    def _job_controller(self, job_key: tuple, pod: _Pod) -> None:
        key = ("Job", *job_key)
        job = copy.deepcopy(self.objects[key])
        status = job.setdefault("status", {})
        run = pod.run
        index = pod.obj["metadata"]["labels"].get(INDEX_LABEL)
        if run.exit_code == 0:
            completions = job["spec"].get("completions", 1)
            for other in self._pods.values():  # the other workers finish with the chief
                if (
                    other is not pod
                    and other.obj["metadata"]["labels"].get(JOB_NAME_LABEL) == job_key[1]
                ):
                    other.obj["status"]["phase"] = "Succeeded"
            status.update(active=0, ready=0, succeeded=completions, completionTime=now())
            if index is not None:
                status["completedIndexes"] = f"0-{completions - 1}" if completions > 1 else "0"
            status["conditions"] = [
                _condition(
                    "SuccessCriteriaMet",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                ),
                _condition(
                    "Complete",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                ),
            ]
        else:
            action, rule = _failure_policy_action(job, pod.obj)
            if action != "Ignore":
                status["failed"] = status.get("failed", 0) + 1
            if action == "FailJob":
                message = (
                    f"Container {rule[1]} for pod {pod.obj['metadata']['namespace']}/"
                    f"{pod.obj['metadata']['name']} failed with exit code {run.exit_code} "
                    f"matching FailJob rule at index {rule[0]}"
                )
                self._fail_job(status, "PodFailurePolicy", message)
            elif run.deadline_after:
                self._fail_job(
                    status, "DeadlineExceeded", "Job was active longer than specified deadline"
                )
            elif status.get("failed", 0) > job["spec"].get("backoffLimit", 6):
                self._fail_job(
                    status, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                )
            else:
                runs = self._runs.get(job_key, [])
                replacement = runs.pop(0) if runs else PodRun(pending=True)
                self.objects[key] = job
                self._store(key, job)
                self._new_pod(key, int(index) if index is not None else None, replacement)
                return
        self._store(key, job)

    @staticmethod
    def _fail_job(status: dict, reason: str, message: str) -> None:
        status.update(active=0, ready=0)
        status["conditions"] = [
            _condition("FailureTarget", "True", reason, message),
            _condition("Failed", "True", reason, message),
        ]


def _condition(
    kind: str, status: str, reason: str | None = None, message: str | None = None
) -> dict:
    condition = {"type": kind, "status": status, "lastTransitionTime": now()}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def _container_status(name: str, state: dict, ready: bool = False) -> dict:
    return {
        "name": name,
        "state": state,
        "ready": ready,
        "restartCount": 0,
        "image": "convstack-trainer:test",
        "imageID": "",
    }


def _failure_policy_action(job: dict, pod: dict) -> tuple[str, tuple[int, str]]:
    """The Job's podFailurePolicy applied to a failed pod: (action, (rule index, container))."""
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    container = pod["status"]["containerStatuses"][0]["name"]
    conditions = {(c["type"], c["status"]) for c in pod["status"].get("conditions", [])}
    rules = (job["spec"].get("podFailurePolicy") or {}).get("rules", [])
    for position, rule in enumerate(rules):
        on_codes = rule.get("onExitCodes")
        if on_codes and on_codes.get("containerName", container) == container:
            inside = terminated["exitCode"] in on_codes["values"]
            if inside == (on_codes["operator"] == "In"):
                return rule["action"], (position, container)
        for pattern in rule.get("onPodConditions") or []:
            if (pattern["type"], pattern.get("status", "True")) in conditions:
                return rule["action"], (position, container)
    return "Count", (-1, container)


def _selects(selector: str, labels: dict) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_paths(obj: dict, prefix: tuple = ()) -> set[tuple]:
    """Leaf paths of the fields an object sets: maps recurse, lists and scalars are leaves;
    server-owned metadata and status are left out."""
    paths: set[tuple] = set()
    for key, value in obj.items():
        path = (*prefix, key)
        if not prefix and key in ("apiVersion", "kind", "status"):
            continue
        if prefix == ("metadata",) and key in _SERVER_METADATA:
            continue
        if isinstance(value, dict) and value:
            paths |= _field_paths(value, path)
        else:
            paths.add(path)
    return paths


_MISSING = object()


def _get_path(obj: dict, path: tuple):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _set_path(obj: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    obj[path[-1]] = copy.deepcopy(value)


def _delete_path(obj: dict, path: tuple) -> None:
    for key in path[:-1]:
        obj = obj.get(key)
        if not isinstance(obj, dict):
            return
    obj.pop(path[-1], None)


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _fields_v1(paths: set[tuple]) -> dict:
    tree: dict = {}
    for path in sorted(paths):
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree
