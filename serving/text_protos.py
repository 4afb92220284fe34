"""TF Serving's text-format config messages that the tensorflow-serving-api wheel does not ship,
declared field for field and parsed by protobuf's own `text_format`.

`--ssl_config_file` (SSLConfig, config/ssl_config.proto), `--monitoring_config_file`
(MonitoringConfig, config/monitoring_config.proto) and `--batching_parameters_file`
(BatchingParameters, servables/tensorflow/session_bundle_config.proto) are text protos that TF
Serving reads with protobuf's parser. Declaring the same messages (names, numbers, types) and
handing the text to the same parser means a file parses here exactly when it parses there: comments,
adjacent strings, `<>` brackets, list syntax and all; unknown fields are errors.
"""

from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, text_format, wrappers_pb2
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

_PACKAGE = "tensorflow.serving"
_Field = descriptor_pb2.FieldDescriptorProto
_STRING, _BOOL, _INT64 = _Field.TYPE_STRING, _Field.TYPE_BOOL, _Field.TYPE_INT64

# Message name -> (field name, number, scalar type or message type name, repeated).
_MESSAGES: dict[str, tuple[tuple[str, int, int | str, bool], ...]] = {
    "SSLConfig": (
        ("server_key", 1, _STRING, False),
        ("server_cert", 2, _STRING, False),
        ("custom_ca", 3, _STRING, False),
        ("client_verify", 4, _BOOL, False),
    ),
    "PrometheusConfig": (
        ("enable", 1, _BOOL, False),
        ("path", 2, _STRING, False),
    ),
    "MonitoringConfig": (("prometheus_config", 1, ".tensorflow.serving.PrometheusConfig", False),),
    "BatchingParameters": (
        ("max_batch_size", 1, ".google.protobuf.Int64Value", False),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value", False),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value", False),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value", False),
        ("thread_pool_name", 5, ".google.protobuf.StringValue", False),
        ("allowed_batch_sizes", 6, _INT64, True),
        ("pad_variable_length_inputs", 7, _BOOL, False),
        ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue", False),
        ("max_execution_batch_size", 9, ".google.protobuf.Int64Value", False),
    ),
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="convstack/serving/tf_serving_configs.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=[wrappers_pb2.DESCRIPTOR.name],
    )
    for message_name, fields in _MESSAGES.items():
        message = file.message_type.add(name=message_name)
        for name, number, kind, repeated in fields:
            field = message.field.add(
                name=name,
                number=number,
                json_name=name,
                label=_Field.LABEL_REPEATED if repeated else _Field.LABEL_OPTIONAL,
            )
            if isinstance(kind, str):
                field.type, field.type_name = _Field.TYPE_MESSAGE, kind
            else:
                field.type = kind
    return file


@functools.cache
def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(_file_descriptor())
    return pool


def message_class(name: str) -> type[Message]:
    """The generated class of `tensorflow.serving.<name>` (one of the messages above)."""
    return GetMessageClass(_pool().FindMessageTypeByName(f"{_PACKAGE}.{name}"))


class TextProtoError(ValueError):
    """The text does not parse as the message; `line` is 1-based (None when unknown) and the
    message is protobuf's own, on one line."""

    def __init__(self, detail: str, line: int | None) -> None:
        self.detail = detail
        self.line = line
        super().__init__(detail)


def parse(name: str, text: str) -> Message:
    """Parse `text` as a `tensorflow.serving.<name>` text proto, as TF Serving does."""
    message = message_class(name)()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        detail = str(exc)
        line = exc.GetLine()
        column = exc.GetColumn()
        # protobuf prefixes "line:column : " when it knows the place; it is reported apart.
        prefix = f"{line}:{column} : "
        if line is not None and detail.startswith(prefix):
            detail = detail[len(prefix) :]
        raise TextProtoError(" ".join(detail.split()), line) from None
    return message
