"""`PredictionClient`: TensorFlow Serving's gRPC API (PredictionService, ModelService) for numpy.

Request building, routing (version, label, canary split) and response reading live in
`ClientCore`, which does no I/O and which the asyncio twin shares; the client classes here and
in `aio_client` add the calls.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import numpy as np

from convstack.client import _protos as protos
from convstack.client.connection import (
    ConnectionSettings,
    RetryPolicy,
    TlsConfig,
    call_sync,
    deadline_error,
    open_channel,
)
from convstack.client.errors import PredictionError, invalid_argument
from convstack.client.signature import (
    SignatureSpec,
    check_output_filter,
    find_signature,
    parse_signature_def_map,
    prepare_inputs,
)
from convstack.client.tensors import to_ndarray, to_tensor_proto

__all__ = ["ClientBase", "ClientCore", "Prediction", "PredictionClient"]

STABLE = "stable"
CANARY = "canary"
SIGNATURE_DEF = "signature_def"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# predict_many's requests without a batch_size: about gRPC's default message limit, so that
# servers left at that default accept them too (never more than max_message_bytes).
DEFAULT_REQUEST_BYTES = 4 * 1024 * 1024
# Room for the request's own fields around the tensor bytes.
_MESSAGE_HEADROOM = 0.9
_AVAILABLE = "AVAILABLE"
_END = "END"
# Server errors after which a route's cached signature may be stale (e.g. a label moved to a
# version with other inputs).
_STALE_SIGNATURE_CODES = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND"})

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_STATE_NAMES = protos.get_model_status_pb2.ModelVersionStatus.State.Name


@dataclass(frozen=True)
class Prediction:
    """One Predict call's result: outputs by alias, the version that served it, the label it was
    routed by (None when no label was used) and the signature that ran.

    Output arrays decoded from `tensor_content` are read-only views of the response (no copy);
    `np.array(prediction["probabilities"])` gives a writable one.
    """

    outputs: dict[str, np.ndarray]
    version: int
    label: str | None
    signature: str

    def __getitem__(self, key: str) -> np.ndarray:
        return self.outputs[key]


class Route(NamedTuple):
    """Where a call goes: a version, a label, or neither (the highest loaded version)."""

    version: int | None
    label: str | None


class ClientCore:
    """Settings, routing, request building and response reading, without any I/O."""

    def __init__(
        self,
        model_name: str,
        *,
        version: int | None,
        version_label: str | None,
        signature: str,
        canary_fraction: float,
        validate: bool,
        rng: random.Random | None,
    ) -> None:
        if not model_name:
            raise ValueError("model_name must not be empty")
        if version is not None and version_label is not None:
            raise ValueError("give version or version_label, not both")
        if not 0.0 <= canary_fraction <= 1.0:
            raise ValueError(f"canary_fraction must be within [0, 1], got {canary_fraction}")
        if canary_fraction and (version is not None or version_label is not None):
            raise ValueError("canary_fraction chooses the label itself: drop version/version_label")
        self.model_name = model_name
        self.signature = signature
        self.canary_fraction = canary_fraction
        self.validate = validate
        self.rng = rng or random.Random()
        self.default_route = Route(version, STABLE if canary_fraction else version_label)
        self.signatures: dict[Route, dict[str, SignatureSpec]] = {}

    # --- routing ---------------------------------------------------------------------------

    def pick_route(self) -> Route:
        """The default route, or for a canary split a draw between `canary` and `stable`."""
        if self.canary_fraction:
            return Route(None, CANARY if self.rng.random() < self.canary_fraction else STABLE)
        return self.default_route

    def fill_model_spec(self, spec, route: Route, signature: str | None = None) -> None:
        spec.name = self.model_name
        if route.version is not None:
            spec.version.value = route.version
        elif route.label is not None:
            spec.version_label = route.label
        if signature is not None:
            spec.signature_name = signature

    # --- signatures ------------------------------------------------------------------------

    def needs_signature(self, inputs) -> bool:
        return self.validate or not isinstance(inputs, Mapping)

    def metadata_request(self, route: Route):
        request = protos.get_model_metadata_pb2.GetModelMetadataRequest()
        self.fill_model_spec(request.model_spec, route)
        request.metadata_field.append(SIGNATURE_DEF)
        return request

    def read_metadata(self, route: Route, response) -> dict[str, SignatureSpec]:
        """Parse a GetModelMetadataResponse and cache its signatures for `route`."""
        specs = parse_signature_def_map(signature_def_map(response))
        self.signatures[route] = specs
        return specs

    def signature_spec(self, route: Route) -> SignatureSpec:
        return find_signature(self.signatures[route], self.signature, self.model_name)

    def forget(self, route: Route, error: PredictionError) -> None:
        if error.code in _STALE_SIGNATURE_CODES:
            self.signatures.pop(route, None)

    # --- predict ---------------------------------------------------------------------------

    def predict_request(
        self, route: Route, spec: SignatureSpec | None, inputs, output_filter: Sequence[str]
    ):
        """A PredictRequest for `inputs`, checked against `spec` first when validating."""
        arrays = prepare_inputs(spec, inputs, validate=self.validate)
        if spec is not None and self.validate:
            check_output_filter(spec, output_filter)
        request = protos.predict_pb2.PredictRequest()
        self.fill_model_spec(request.model_spec, route, self.signature)
        for name, value in arrays.items():
            try:
                request.inputs[name].CopyFrom(to_tensor_proto(value))
            except (TypeError, ValueError) as exc:
                raise invalid_argument(f"input {name!r}: {exc}", input=name) from None
        request.output_filter.extend(output_filter)
        return request

    def prediction(self, route: Route, response) -> Prediction:
        outputs = {key: to_ndarray(proto) for key, proto in response.outputs.items()}
        return Prediction(
            outputs=outputs,
            version=response.model_spec.version.value,
            label=route.label,
            signature=response.model_spec.signature_name or self.signature,
        )

    def split(self, inputs, spec: SignatureSpec | None, batch_size, max_message_bytes):
        """predict_many's pieces: row slices (views) of every input, in order."""
        arrays = prepare_inputs(spec, inputs, validate=self.validate)
        arrays = {name: np.asarray(value) for name, value in arrays.items()}
        rows = {len(array) if array.ndim else None for array in arrays.values()}
        if len(rows) != 1 or None in rows:
            raise invalid_argument(
                "predict_many: every input needs the same number of rows along axis 0, got "
                + ", ".join(f"{name} {list(array.shape)}" for name, array in arrays.items())
            )
        total = rows.pop()
        per_request = rows_per_request(arrays, total, batch_size, max_message_bytes)
        return [
            {name: array[start : start + per_request] for name, array in arrays.items()}
            for start in range(0, max(total, 1), per_request)
        ]

    # --- models ----------------------------------------------------------------------------

    def status_request(self, version: int | None):
        request = protos.get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        if version is not None:
            request.model_spec.version.value = version
        return request

    def reload_request(self, config):
        request = protos.model_management_pb2.ReloadConfigRequest()
        request.config.CopyFrom(parse_model_server_config(config))
        return request

    def read_reload(self, response) -> None:
        self.signatures.clear()
        code = response.status.error_code
        if code:
            name = _CODE_NAMES.get(code, "UNKNOWN")
            raise PredictionError(name, response.status.error_message, {"method": "ReloadConfig"})


def rows_per_request(arrays: Mapping[str, np.ndarray], total, batch_size, max_message_bytes) -> int:
    """Rows per predict_many request: `batch_size` (or enough for DEFAULT_REQUEST_BYTES), capped
    so that no request exceeds the message limit."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    row_bytes = max(1, sum(_nbytes(a) for a in arrays.values()) / max(total, 1))
    fitting = max(1, int(max_message_bytes * _MESSAGE_HEADROOM // row_bytes))
    wanted = batch_size or max(1, int(DEFAULT_REQUEST_BYTES * _MESSAGE_HEADROOM // row_bytes))
    return min(wanted, fitting)


def _nbytes(array: np.ndarray) -> int:
    if array.dtype.kind == "O":  # strings: their lengths plus a varint each
        return sum(len(item) + 2 for item in array.flat)
    return array.nbytes


def concatenate(pieces: Sequence[Prediction]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p.outputs[key] for p in pieces]) for key in pieces[0].outputs}


def signature_def_map(response):
    """The SignatureDefMap in a GetModelMetadataResponse (INTERNAL if there is none).

    The Any's type_url names TF Serving's `tensorflow.serving.SignatureDefMap`, so Any.Unpack
    into ours (another full name) would refuse it; the bytes are the same message.
    """
    signature_map = protos.get_model_metadata_pb2.SignatureDefMap()
    packed = response.metadata.get(SIGNATURE_DEF)
    if packed is None or not packed.type_url.endswith("/tensorflow.serving.SignatureDefMap"):
        raise PredictionError("INTERNAL", "GetModelMetadata answered without signature_def")
    signature_map.ParseFromString(packed.value)
    return signature_map


def parse_model_server_config(config):
    """A ModelServerConfig from itself (ours or TF Serving's) or its text format
    (INVALID_ARGUMENT if malformed)."""
    from google.protobuf import text_format

    message_type = protos.model_server_config_pb2.ModelServerConfig
    if isinstance(config, message_type):
        return config
    if _is_tf_serving_config(config):
        # TF Serving's class (e.g. from the rollout's store): the same bytes as ours.
        return message_type.FromString(config.SerializeToString())
    if not isinstance(config, str):
        raise TypeError(f"config must be a ModelServerConfig or its text, got {type(config)}")
    try:
        return text_format.Parse(config, message_type())
    except text_format.ParseError as exc:
        raise invalid_argument(f"not a ModelServerConfig text proto: {exc}") from None


def _is_tf_serving_config(config) -> bool:
    descriptor = getattr(config, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) == "tensorflow.serving.ModelServerConfig"


def version_statuses(response) -> list[dict]:
    """GetModelStatusResponse as [{version, state, error_code, error_message}], newest first."""
    return [
        {
            "version": status.version,
            "state": _STATE_NAMES(status.state),
            "error_code": _CODE_NAMES.get(status.status.error_code, "UNKNOWN"),
            "error_message": status.status.error_message,
        }
        for status in response.model_version_status
    ]


def available_version(statuses: list[dict], version: int | None, model: str) -> int | None:
    """The version wait_until_available waits for, if it is AVAILABLE now; raises the load
    error of a wanted version that ended failed."""
    for status in statuses:
        if version is not None and status["version"] != version:
            continue
        if status["state"] == _AVAILABLE:
            return status["version"]
        if version is not None and status["state"] == _END and status["error_code"] != "OK":
            raise PredictionError(
                status["error_code"],
                f"version {version} of model {model!r} failed to load: {status['error_message']}",
            )
    return None


def keep_waiting(error: PredictionError) -> bool:
    # Server not up yet, or the model/version not known to it yet.
    return error.code in ("UNAVAILABLE", "NOT_FOUND")


def closed_error(client) -> PredictionError:
    return PredictionError("FAILED_PRECONDITION", f"{client!r} is closed")


def client_settings(target: str, **kwargs) -> ConnectionSettings:
    retries = kwargs.pop("retries")
    backoff = kwargs.pop("backoff")
    codes = frozenset(kwargs.pop("retry_codes"))
    metadata = tuple(tuple(pair) for pair in kwargs.pop("metadata"))
    options = tuple(kwargs.pop("channel_options"))
    return ConnectionSettings(
        target=target,
        retry=RetryPolicy(retries, tuple(backoff), codes),
        metadata=metadata,
        options=options,
        **kwargs,
    )


class ClientBase:
    """What PredictionClient and AsyncPredictionClient share: their arguments, the routing core
    and the connection settings (see PredictionClient for the arguments)."""

    def __init__(
        self,
        target: str,
        model_name: str,
        *,
        version: int | None = None,
        version_label: str | None = None,
        signature: str = "serving_default",
        timeout: float | None = 10.0,
        retries: int = 3,
        backoff: tuple[float, float] = (0.05, 2.0),
        retry_codes: Sequence[str] = ("UNAVAILABLE",),
        keepalive_seconds: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: TlsConfig | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        canary_fraction: float = 0.0,
        validate: bool = True,
        load_balancing: str | None = None,
        channel_options: Sequence[tuple[str, object]] = (),
        rng: random.Random | None = None,
    ) -> None:
        self._core = ClientCore(
            model_name,
            version=version,
            version_label=version_label,
            signature=signature,
            canary_fraction=canary_fraction,
            validate=validate,
            rng=rng,
        )
        self._settings = client_settings(
            target,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            retry_codes=retry_codes,
            keepalive_seconds=keepalive_seconds,
            max_message_bytes=max_message_bytes,
            tls=tls,
            metadata=metadata,
            load_balancing=load_balancing,
            channel_options=channel_options,
        )
        self._channel = None
        self._predictions = None
        self._models = None
        self._closed = False
        self._connect()

    def _connect(self) -> None:
        """Open the channel at construction; the asyncio client leaves it for first use."""

    @property
    def target(self) -> str:
        return self._settings.target

    @property
    def model_name(self) -> str:
        return self._core.model_name


class PredictionClient(ClientBase):
    """A TensorFlow Serving client for one model, speaking only `tensorflow_serving.apis`.

    ```
    with PredictionClient("localhost:8500", "digits") as client:
        prediction = client.predict(images)      # float32 [n, 28, 28, 1]
        print(prediction["classes"], prediction.version)
    ```

    Routing: `version` pins a version, `version_label` a label (e.g. "stable"); neither means
    the highest loaded version. `canary_fraction=0.1` sends that share of calls to the "canary"
    label and the rest to "stable" (`Prediction.label` tells which); `rng` seeds that draw and
    the retry jitter.

    Connection: `timeout` is each call's deadline in seconds, retries included (None: none);
    `retries` retries with full-jitter exponential `backoff` (base, cap) seconds on the
    `retry_codes` (UNAVAILABLE only by default: other failures would fail again);
    `keepalive_seconds` pings a connection with calls in flight; `max_message_bytes` bounds
    both directions; `tls` (a TlsConfig) for TLS and mutual TLS; `metadata` pairs go with every
    call (e.g. ("authorization", "Bearer ...")). Targets naming a resolver (`dns:///host:8500`,
    `ipv4:a:p,b:p`) balance calls round_robin over all addresses (`load_balancing` overrides).

    Inputs are checked against the signature (fetched once per route, then cached) before
    sending, unless `validate=False`. Every failure raises PredictionError.
    """

    def _connect(self) -> None:
        self._channel = open_channel(self._settings)
        self._predictions = protos.prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = protos.model_service_pb2_grpc.ModelServiceStub(self._channel)

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._closed = True
        self._channel.close()

    def _call(self, method: str, invoke, request, timeout=None, metadata=()):
        if self._closed:
            raise closed_error(self)
        return call_sync(
            self._settings,
            method,
            invoke,
            request,
            timeout=timeout,
            metadata=metadata,
            rng=self._core.rng,
        )

    def _signature(self, route: Route, timeout=None) -> SignatureSpec:
        if route not in self._core.signatures:
            self._fetch_metadata(route, timeout)
        return self._core.signature_spec(route)

    def _fetch_metadata(self, route: Route, timeout=None):
        request = self._core.metadata_request(route)
        invoke = self._predictions.GetModelMetadata
        response = self._call("GetModelMetadata", invoke, request, timeout)
        return response.model_spec.version.value, self._core.read_metadata(route, response)

    def predict(
        self,
        inputs,
        *,
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Prediction:
        """Run the signature on `inputs` (a dict of arrays, or one array for a single-input
        signature); `output_filter` limits the outputs; `timeout` and `metadata` apply to this
        call only."""
        route = self._core.pick_route()
        spec = self._signature(route, timeout) if self._core.needs_signature(inputs) else None
        request = self._core.predict_request(route, spec, inputs, output_filter)
        try:
            response = self._call("Predict", self._predictions.Predict, request, timeout, metadata)
        except PredictionError as error:
            self._core.forget(route, error)
            raise
        return self._core.prediction(route, response)

    def predict_many(
        self,
        inputs,
        *,
        batch_size: int | None = None,
        concurrency: int = 4,
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Predict on many rows: split along axis 0 into requests of `batch_size` rows (always
        under the message size limit), send up to `concurrency` at once, and return the
        outputs concatenated in input order. Each request has its own `timeout`."""
        route = self._core.default_route
        spec = self._signature(route, timeout) if self._core.needs_signature(inputs) else None
        pieces = self._core.split(inputs, spec, batch_size, self._settings.max_message_bytes)

        def run(piece):
            return self.predict(piece, output_filter=output_filter, timeout=timeout)

        with ThreadPoolExecutor(max(1, min(concurrency, len(pieces)))) as pool:
            futures = [pool.submit(run, piece) for piece in pieces]
            try:
                results = [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return concatenate(results)

    def metadata(self, *, timeout: float | None = None) -> dict:
        """The model's signatures as plain Python: {signature: {"inputs": {name: {"dtype":
        "float32", "shape": [-1, 28, 28, 1]}}, "outputs": {...}, "method_name": ...}} (shapes
        with -1 for any size, None for unknown rank). Always asks the server (and refreshes
        the cache predict validates against)."""
        _, specs = self._fetch_metadata(self._core.default_route, timeout)
        return {name: spec.as_dict() for name, spec in specs.items()}

    def served_version(self, *, timeout: float | None = None) -> int:
        """The version this client's route resolves to now (GetModelMetadata's model_spec)."""
        version, _ = self._fetch_metadata(self._core.default_route, timeout)
        return version

    def status(self, version: int | None = None, *, timeout: float | None = None) -> list[dict]:
        """The model's versions (or one), newest first: [{"version", "state", "error_code",
        "error_message"}], states being START, LOADING, AVAILABLE, UNLOADING or END."""
        request = self._core.status_request(version)
        response = self._call("GetModelStatus", self._models.GetModelStatus, request, timeout)
        return version_statuses(response)

    def wait_until_available(
        self, version: int | None = None, *, timeout: float = 60.0, poll_seconds: float = 0.2
    ) -> int:
        """Block until `version` (default: the client's pinned version, else any version) is
        AVAILABLE and return it; waits through an unreachable server or an unknown model.
        DEADLINE_EXCEEDED after `timeout`; a wanted version that failed to load raises its
        load error."""
        version = self._core.default_route.version if version is None else version
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            remaining = deadline - time.monotonic()
            try:
                statuses = self.status(version, timeout=max(0.01, min(remaining, 10.0)))
                found = available_version(statuses, version, self.model_name)
                if found is not None:
                    return found
                last = ", ".join(f"{s['version']}: {s['state']}" for s in statuses)
            except PredictionError as error:
                if not keep_waiting(error):
                    raise
                last = str(error)
            if time.monotonic() + poll_seconds >= deadline:
                what = f"version {version}" if version is not None else "a version"
                raise deadline_error(
                    f"{what} of model {self.model_name!r} not AVAILABLE ({last})",
                    timeout,
                    model=self.model_name,
                )
            time.sleep(poll_seconds)

    def reload_config(self, config, *, timeout: float | None = None) -> None:
        """Replace the server's model config (a ModelServerConfig or its text format) via
        HandleReloadConfigRequest; raises PredictionError if the server refuses it."""
        request = self._core.reload_request(config)
        response = self._call(
            "HandleReloadConfigRequest", self._models.HandleReloadConfigRequest, request, timeout
        )
        self._core.read_reload(response)

    def __repr__(self) -> str:
        return f"PredictionClient({self.target!r}, {self.model_name!r})"
