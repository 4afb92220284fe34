"""The model lifecycle: which versions are loaded, loading and unloading them, serving handles.

Follows TF Serving's ServerCore + AspiredVersionsManager with its AvailabilityPreservingPolicy:
each poll lists every model's version directories, the version policy picks the aspired
versions, new aspired versions load (and warm up) on a thread pool with retries, and a version
that is no longer aspired unloads only once an aspired version is AVAILABLE (or when nothing is
aspired any more), so a model never loses its last version while a replacement is pending.
A failed load ends in END with its error while the other versions keep serving. Requests hold a
reference (`acquire`), and an unload waits until every reference is released.

Threads, not asyncio: transports call the cheap methods directly and `acquire`d versions' `run`
from their executors. One re-entrant lock guards all state; TensorFlow work and file-system
scans happen outside it.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from convstack.serving import model_config
from convstack.serving.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServingError,
    error_for_code,
)
from convstack.serving.model_config import ModelConfig, ModelServerConfig
from convstack.serving.servable import LoadError, Servable, load_version
from convstack.serving.version_policy import aspired_versions, numeric_version_dirs

logger = logging.getLogger(__name__)

CANCELLED_BEFORE_LOAD = "Load cancelled before we could try to load."


class VersionState(enum.IntEnum):
    """tensorflow_serving.apis.get_model_status_pb2.ModelVersionStatus.State values."""

    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class VersionStatus:
    """One version's state and status, as GetModelStatus reports it."""

    version: int
    state: VersionState
    error_code: str = "OK"
    error_message: str = ""


@dataclass(eq=False)
class _Version:
    """One load of one version (a re-load after an unload is a new record)."""

    model: str
    version: int
    path: Path
    state: VersionState = VersionState.START
    error_code: str = "OK"
    error_message: str = ""
    loaded: Servable | None = None
    refs: int = 0  # requests holding the loaded version
    # A failed load is not retried while the version stays aspired (TF Serving keeps it in
    # error); it loads again once it has left the aspired set and come back.
    retry_blocked: bool = False

    def status(self) -> VersionStatus:
        return VersionStatus(self.version, self.state, self.error_code, self.error_message)

    def end(self, code: str = "OK", message: str = "") -> None:
        self.state, self.error_code, self.error_message = VersionState.END, code, message


@dataclass(eq=False)
class _Model:
    name: str
    config: ModelConfig | None = None  # None once dropped from the config; history stays
    aspired: dict[int, Path] = field(default_factory=dict)
    versions: dict[int, _Version] = field(default_factory=dict)
    scan_problem: str | None = None  # last poll problem, logged once per change


def _copy_config(config: ModelServerConfig) -> ModelServerConfig:
    copy = ModelServerConfig()
    copy.CopyFrom(config)
    return copy


def _check_config(config: ModelServerConfig) -> None:
    try:
        model_config.validate_model_config(config)
    except model_config.ModelConfigError as exc:
        raise InvalidArgument(str(exc)) from exc


class ModelManager:
    """Serves the models of a ModelServerConfig the way TensorFlow Serving does.

    `file_system_poll_wait_seconds`: seconds between scans of the base paths (0 scans once at
    start, < 0 never). Each load is retried `max_num_load_retries` times,
    `load_retry_interval_seconds` apart, on `num_load_threads` threads. Labels may point at
    versions that are not AVAILABLE only with `allow_version_labels_for_unavailable_models`.
    `on_event(message)` receives every lifecycle log line; it runs on manager threads, possibly
    under the manager's lock, so it must be quick and must not wait for other threads.
    An invalid `config` raises InvalidArgument.
    """

    def __init__(
        self,
        config: ModelServerConfig,
        *,
        file_system_poll_wait_seconds: float = 1.0,
        max_num_load_retries: int = 5,
        load_retry_interval_seconds: float = 1.0,
        num_load_threads: int = 2,
        warmup: bool = True,
        warmup_iterations: int = 1,
        allow_version_labels_for_unavailable_models: bool = False,
        on_event: Callable[[str], None] | None = None,
        load: Callable[[str, int, Path], Servable] = load_version,
    ):
        _check_config(config)
        self._load_version = load
        self._config = _copy_config(config)
        self._poll_wait = file_system_poll_wait_seconds
        self._max_retries = max(0, int(max_num_load_retries))
        self._retry_interval = max(0.0, float(load_retry_interval_seconds))
        self._num_load_threads = max(1, int(num_load_threads))
        self._warmup = warmup
        self._warmup_iterations = max(1, int(warmup_iterations))
        self._allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._on_event = on_event
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._poll_lock = threading.Lock()  # one scan at a time; config swaps happen under it
        self._reload_lock = threading.Lock()
        self._stop_event = threading.Event()
        self._models: dict[str, _Model] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._loader: ThreadPoolExecutor | None = None
        self._unloader: ThreadPoolExecutor | None = None
        self._poll_thread: threading.Thread | None = None
        self._running = False
        self._started = False

    # ----------------------------------------------------------------------------- lifecycle

    def start(self, wait: bool = True, timeout: float | None = None) -> None:
        """Scan and load the configured models; with `wait`, return once they have settled.

        Like TF Serving, which opens its ports only after the initial load: labels must point
        at AVAILABLE versions (FailedPrecondition before anything loads, unless
        allow_version_labels_for_unavailable_models), and if a model that has versions on disk
        ends up with none AVAILABLE, the manager stops again and raises UNKNOWN naming the
        failed versions. DeadlineExceeded (and a stop) if `timeout` seconds pass first. A model
        with no version on disk yet does not hold up the start (TF Serving would wait for one);
        it loads when a poll finds a version.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("ModelManager.start() may be called only once")
            if self._stop_event.is_set():
                raise Cancelled("the server stopped before its models were loaded")
            labels = self._resolve_labels(self._config)
            self._started = self._running = True
            self._loader = ThreadPoolExecutor(self._num_load_threads, "model-load")
            self._unloader = ThreadPoolExecutor(self._num_load_threads, "model-unload")
            self._apply_config(self._config, labels)
        if self._poll_wait >= 0:
            self.poll_once()
        if self._poll_wait > 0:
            self._poll_thread = threading.Thread(
                target=self._poll_loop, name="model-poll", daemon=True
            )
            self._poll_thread.start()
        if not wait:
            return
        try:
            names = self.model_names()
            self._wait_settled(names, timeout)
            if self._stop_event.is_set():
                raise Cancelled("the server stopped before its models were loaded")
            self._raise_if_unavailable(names, "servable(s) did not become available")
        except ServingError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop polling, cancel pending loads and unload every version.

        Blocks until in-flight requests have released their versions.
        """
        with self._lock:
            # Set first: it cancels load retries, and a start() that has not begun yet.
            self._stop_event.set()
            was_running, self._running = self._running, False
            self._changed.notify_all()  # wakes a start() waiting for the initial loads
        if not was_running:
            return
        if self._poll_thread is not None:
            self._poll_thread.join()
        with self._poll_lock, self._lock:
            for model in self._models.values():
                self._unaspire_all(model)
                self._reconcile(model, reason="the server is stopping")
        self._loader.shutdown(wait=True)
        with self._lock:
            self._changed.wait_for(self._all_ended)
        self._unloader.shutdown(wait=True)
        self._emit("Model manager stopped")

    def _poll_loop(self) -> None:
        while not self._stop_event.wait(self._poll_wait):
            try:
                self.poll_once()
            except Exception:  # a bad poll must not end polling for good
                logger.exception("Polling the model base paths failed")

    # ------------------------------------------------------------------------------- polling

    def poll_once(self) -> None:
        """Rescan every base path: load new aspired versions, unload those no longer aspired.

        Returns without waiting for loads; unloads happen only once they preserve availability.
        """
        with self._poll_lock:
            self._poll()

    def _poll(self) -> None:
        with self._lock:
            if not self._running:
                return
            targets = [
                (model.name, model.config.base_path, model.config.model_version_policy)
                for model in self._models.values()
                if model.config is not None
            ]
        scans = {name: _scan(name, base, policy) for name, base, policy in targets}
        with self._lock:
            for name, (aspired, problem) in scans.items():
                model = self._models.get(name)
                if model is None or model.config is None:
                    continue
                if problem != model.scan_problem:
                    model.scan_problem = problem
                    if problem:
                        self._emit(problem, logging.WARNING)
                if aspired is not None:  # None: the base path could not be listed; keep state
                    self._set_aspired(model, aspired)
                self._reconcile(model)

    def _set_aspired(self, model: _Model, aspired: dict[int, Path]) -> None:
        for version, record in model.versions.items():
            if version not in aspired:
                record.retry_blocked = False
        model.aspired = aspired

    def _unaspire_all(self, model: _Model) -> None:
        self._set_aspired(model, {})

    # ------------------------------------------------------------------- load/unload decisions

    def _reconcile(self, model: _Model, reason: str | None = None) -> None:
        """Start the loads and unloads `model` needs now (called with the lock held)."""
        if self._running:
            for version in sorted(model.aspired, reverse=True):  # newest first, like TF Serving
                record = model.versions.get(version)
                if record is None or (
                    record.state == VersionState.END and not record.retry_blocked
                ):
                    self._start_load(model, version)
        for record in model.versions.values():
            if record.state == VersionState.START and record.version not in model.aspired:
                record.end("CANCELLED", CANCELLED_BEFORE_LOAD)
                self._emit(f"Cancelled loading {model.name} version {record.version}")
        for record, why in self._unloads_due(model):
            self._start_unload(record, reason or why)
        self._changed.notify_all()

    def _unloads_due(self, model: _Model) -> list[tuple[_Version, str]]:
        """AvailabilityPreservingPolicy: which unaspired AVAILABLE versions may unload now."""
        aspired_available = [
            v
            for v in model.aspired
            if v in model.versions and model.versions[v].state == VersionState.AVAILABLE
        ]
        unaspired_available = sorted(
            (
                r
                for r in model.versions.values()
                if r.state == VersionState.AVAILABLE and r.version not in model.aspired
            ),
            key=lambda r: r.version,
        )
        # A version still listed in a `specific` policy stays loaded even when its directory is
        # gone (TF Serving's rule), except when the model is dropped or the server stops.
        keep = (
            set(model.config.model_version_policy.specific.versions)
            if model.config is not None and self._running
            else set()
        )
        due = []
        while unaspired_available and (
            not model.aspired or aspired_available or len(unaspired_available) > 1
        ):
            record = unaspired_available.pop(0)
            if record.version in keep:
                break
            if not model.aspired:
                why = "no version of the model is aspired any more"
            elif aspired_available:
                why = f"version {max(aspired_available)} is AVAILABLE and it is no longer aspired"
            else:
                why = "it is no longer aspired and a newer unaspired version still serves"
            due.append((record, why))
        return due

    def _start_load(self, model: _Model, version: int) -> None:
        record = _Version(model.name, version, model.aspired[version])
        model.versions[version] = record
        self._loader.submit(self._load, record)

    def _start_unload(self, record: _Version, reason: str) -> None:
        record.state = VersionState.UNLOADING
        self._emit(f"Unloading {record.model} version {record.version}: {reason}")
        self._unloader.submit(self._unload, record)

    # ------------------------------------------------------------------------ load and unload

    def _load(self, record: _Version) -> None:
        with self._lock:
            if record.state != VersionState.START:  # cancelled while queued
                return
            record.state = VersionState.LOADING
            self._changed.notify_all()
        self._emit(f"Loading {record.model} version {record.version} from {record.path}")
        try:
            loaded, warmup_count, error, attempts = self._load_with_retries(record)
        except Exception as exc:  # never leave a version LOADING forever
            logger.exception("Unexpected failure loading %s", record)
            loaded, warmup_count, attempts = None, 0, 1
            error = LoadError(f"{type(exc).__name__}: {exc}")
        with self._lock:
            if error is None:
                record.loaded, record.state = loaded, VersionState.AVAILABLE
                self._emit(
                    f"{record.model} version {record.version} is AVAILABLE "
                    f"({warmup_count} warmup records replayed)"
                )
            else:
                record.end(error.code, error.message)
                record.retry_blocked = True
                self._emit(
                    f"{record.model} version {record.version} failed to load after {attempts} "
                    f"attempt(s) and is END: {error.code}: {error.message}",
                    logging.ERROR,
                )
            self._reconcile(self._models[record.model])

    def _load_with_retries(self, record: _Version):
        """(loaded, warmup records, None, attempts) or (None, 0, last error, attempts)."""
        attempts = self._max_retries + 1
        error: ServingError | None = None
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                if self._stop_event.wait(self._retry_interval) or not self._still_aspired(record):
                    self._emit(f"Load retries of {record.model} version {record.version} cancelled")
                    return None, 0, error, attempt - 1
                self._emit(
                    f"Retrying load of {record.model} version {record.version} "
                    f"(retry {attempt - 1} of {self._max_retries})"
                )
            try:
                loaded = self._load_version(record.model, record.version, record.path)
                replayed = loaded.warmup(self._warmup_iterations) if self._warmup else 0
                return loaded, replayed, None, attempt
            except ServingError as exc:
                error = exc
            except Exception as exc:
                error = LoadError(f"{type(exc).__name__}: {exc}")
            self._emit(
                f"{record.model} version {record.version} failed to load (attempt {attempt} of "
                f"{attempts}): {error.code}: {error.message}",
                logging.WARNING,
            )
        return None, 0, error, attempts

    def _still_aspired(self, record: _Version) -> bool:
        with self._lock:
            model = self._models[record.model]
            return (
                self._running
                and model.versions.get(record.version) is record
                and (record.version in model.aspired)
            )

    def _unload(self, record: _Version) -> None:
        with self._lock:
            if record.refs:
                self._emit(
                    f"{record.model} version {record.version} waits for {record.refs} in-flight "
                    "request(s) before unloading"
                )
            self._changed.wait_for(lambda: record.refs == 0)
            loaded, record.loaded = record.loaded, None
        if loaded is not None:
            loaded.close()  # the session and its variables go here, outside the lock
        with self._lock:
            record.end()
            self._emit(f"{record.model} version {record.version} unloaded")
            self._reconcile(self._models[record.model])

    # -------------------------------------------------------------------------------- config

    def reload_config(self, config: ModelServerConfig, timeout: float | None = None) -> None:
        """Serve exactly `config`: new models load, dropped ones unload, policies/labels update.

        Validation errors raise InvalidArgument and label errors FailedPrecondition (a label
        may only point at a currently AVAILABLE version unless
        allow_version_labels_for_unavailable_models, and even then an existing label cannot
        move to an unavailable version); either way the previous config stays in force.
        Otherwise waits until the aspired versions have settled (DeadlineExceeded after
        `timeout` seconds); raises UNKNOWN if a newly added model ends with no AVAILABLE
        version (the new config stays in force, as in TF Serving).
        """
        _check_config(config)
        with self._reload_lock:
            with self._poll_lock:
                with self._lock:
                    if not self._running:
                        raise FailedPrecondition("The model manager is not running")
                    labels = self._resolve_labels(config)
                    previous = set(self.model_names())
                    self._config = _copy_config(config)
                    self._apply_config(self._config, labels)
                self._poll()
            names = self.model_names()
            self._wait_settled(names, timeout)
            added = [name for name in names if name not in previous]
            self._raise_if_unavailable(added, "servable(s) of new models did not become available")

    def _apply_config(self, config: ModelServerConfig, labels: dict[str, dict[str, int]]) -> None:
        names = set()
        for entry in config.model_config_list.config:
            names.add(entry.name)
            model = self._models.setdefault(entry.name, _Model(entry.name))
            if model.config is None:
                self._emit(f"Adding model {entry.name} (base path {entry.base_path})")
            model.config = ModelConfig()
            model.config.CopyFrom(entry)
        for model in self._models.values():
            if model.config is not None and model.name not in names:
                model.config = None
                self._emit(f"Removing model {model.name}: it is no longer in the config")
                self._unaspire_all(model)
                self._reconcile(model, reason="the model was removed from the config")
        self._labels = labels

    def _resolve_labels(self, config: ModelServerConfig) -> dict[str, dict[str, int]]:
        """The label map of `config`, checked against the current states (TF Serving's rule)."""
        labels: dict[str, dict[str, int]] = {}
        for entry in config.model_config_list.config:
            model = self._models.get(entry.name)
            for label, version in sorted(entry.version_labels.items()):
                record = model.versions.get(version) if model else None
                available = record is not None and record.state == VersionState.AVAILABLE
                existing = self._labels.get(entry.name, {}).get(label)
                # The flag lets a label point ahead of a load, but never moves an existing
                # label onto a version that cannot serve.
                allowed = self._allow_unavailable_labels and existing in (None, version)
                if not (available or allowed):
                    raise FailedPrecondition(
                        f"Request to assign label to version {version} of model {entry.name}, "
                        "which is not currently available for inference"
                    )
                labels.setdefault(entry.name, {})[label] = version
        return labels

    # -------------------------------------------------------------------------------- waiting

    def _all_ended(self) -> bool:
        return all(
            record.state == VersionState.END
            for model in self._models.values()
            for record in model.versions.values()
        )

    def _pending(self, names: list[str]) -> list[str]:
        pending = []
        for name in names:
            model = self._models.get(name)
            if model is None or model.config is None:
                continue
            for version in sorted(model.aspired):
                record = model.versions.get(version)
                if record is None or record.state not in (
                    VersionState.AVAILABLE,
                    VersionState.END,
                ):
                    pending.append(f"{name} version {version}")
        return pending

    def _wait_settled(self, names: list[str], timeout: float | None) -> None:
        with self._lock:
            settled = self._changed.wait_for(
                lambda: not self._running or not self._pending(names), timeout
            )
            if not settled:
                raise DeadlineExceeded(
                    f"Versions still loading after {timeout} s: {', '.join(self._pending(names))}"
                )

    def _raise_if_unavailable(self, names: list[str], summary: str) -> None:
        failures = []
        with self._lock:
            for name in names:
                model = self._models[name]
                versions = model.versions.values()
                if not model.aspired or any(r.state == VersionState.AVAILABLE for r in versions):
                    continue  # no version on disk yet (logged by the poll) or serving
                failures.extend(
                    f"{name} version {r.version}: {r.error_code}: {r.error_message}"
                    for r in sorted(versions, key=lambda r: r.version)
                    if r.version in model.aspired
                )
        if failures:
            # TF Serving's wording: "<n> servable(s) did not become available: {...}".
            raise error_for_code("UNKNOWN", f"{len(failures)} {summary}: {{{'; '.join(failures)}}}")

    # ------------------------------------------------------------------------------ requests

    @contextmanager
    def acquire(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> Iterator[Servable]:
        """Hold a loaded version for one request; it cannot unload until released.

        `version` asks for that version, `label` for the version the label points at, neither
        for the highest AVAILABLE version. Errors as TF Serving: InvalidArgument for an empty
        name or unknown label, NotFound "Servable not found for request: Latest(<name>)" or
        "... Specific(<name>, <version>)".
        """
        record = self._checkout(name, version, label)
        try:
            yield record.loaded
        finally:
            with self._lock:
                record.refs -= 1
                if record.refs == 0:
                    self._changed.notify_all()

    def _checkout(self, name: str, version: int | None, label: str | None) -> _Version:
        if not name:
            raise InvalidArgument("ModelSpec has no name specified.")
        if version is not None and label is not None:
            raise InvalidArgument("ModelSpec must not set both version and version_label")
        with self._lock:
            if label is not None:
                version = self._labels.get(name, {}).get(label)
                if version is None:
                    raise InvalidArgument(f"Unrecognized servable version label: {label}")
            model = self._models.get(name)
            serving = (
                [r for r in model.versions.values() if r.state == VersionState.AVAILABLE]
                if model is not None and model.config is not None
                else []
            )
            if version is None:
                if not serving:
                    raise NotFound(f"Servable not found for request: Latest({name})")
                record = max(serving, key=lambda r: r.version)
            else:
                matches = [r for r in serving if r.version == version]
                if not matches:
                    raise NotFound(f"Servable not found for request: Specific({name}, {version})")
                record = matches[0]
            record.refs += 1
            return record

    # -------------------------------------------------------------------------------- status

    def model_status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Every known version of `name` (newest first), or just `version`; NotFound if none.

        Includes END versions: unloaded ones with OK, failed loads with their error.
        """
        with self._lock:
            model = self._models.get(name)
            if model is None or not model.versions:
                raise NotFound(f"Could not find any versions of model {name}")
            if version is not None:
                record = model.versions.get(version)
                if record is None:
                    raise NotFound(f"Could not find version {version} of model {name}")
                return [record.status()]
            return [model.versions[v].status() for v in sorted(model.versions, reverse=True)]

    def model_names(self) -> list[str]:
        """The configured model names, in config order."""
        with self._lock:
            return [entry.name for entry in self._config.model_config_list.config]

    def labels(self, name: str) -> dict[str, int]:
        """The version labels of `name` in force (label -> version); {} if none."""
        with self._lock:
            return dict(self._labels.get(name, {}))

    def all_models_available(self) -> bool:
        """True when every configured model has at least one AVAILABLE version."""
        with self._lock:
            for name in self.model_names():
                model = self._models.get(name)
                versions = model.versions.values() if model is not None else ()
                if not any(r.state == VersionState.AVAILABLE for r in versions):
                    return False
            return True

    @property
    def config(self) -> ModelServerConfig:
        """A copy of the config in force."""
        with self._lock:
            return _copy_config(self._config)

    # -------------------------------------------------------------------------------- events

    def _emit(self, message: str, level: int = logging.INFO) -> None:
        logger.log(level, message)
        if self._on_event is not None:
            try:
                self._on_event(message)
            except Exception:
                logger.exception("on_event callback failed")


def _scan(name: str, base_path: str, policy) -> tuple[dict[int, Path] | None, str | None]:
    """(aspired version -> directory, or None if the base path cannot be listed; problem)."""
    try:
        directories = numeric_version_dirs(base_path)
    except OSError as exc:
        return None, f"Could not find base path {base_path} for servable {name}: {exc}"
    aspired = aspired_versions(directories, policy)
    problem = None
    if not directories:
        problem = (
            f"No versions of servable {name} found under base path {base_path}. Did you forget "
            "to name your leaf directory as a number (eg. '/1/')?"
        )
    elif policy.WhichOneof("policy_choice") == "specific":
        missing = sorted(set(policy.specific.versions) - set(directories))
        if missing:
            problem = f"Specific versions {missing} of servable {name} not found under {base_path}"
    return {version: directories[version] for version in aspired}, problem
