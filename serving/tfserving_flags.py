"""TF Serving's own flags that the embedded server takes but has nothing to act on.

A command line written for tensorflow_model_server (a Kubernetes manifest, a launch script) must
start the embedded server too, not die on "unrecognized arguments". Each flag here is parsed with
TF Serving's type. What happens to it depends on its kind:

- SAME: the embedded server always behaves one way. Asking for the other way gets one warning
  line naming what it does instead.
- MOOT: nothing to do in this runtime (no file-system caches, no TPU); never a warning.
- REFUSED: a value it cannot honour safely (another platform, ALTS credentials) stops start-up
  with one line, as a bad flag would.

With `--backend tfserving` every one given is passed on to the real server unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from convstack.common.flags import boolean

SAME, MOOT, REFUSED = "same", "moot", "refused"


@dataclass(frozen=True)
class ForeignFlag:
    name: str
    parse: Callable[[str], object]
    kind: str
    behaviour: object  # SAME: the value the embedded server acts as; REFUSED: the one it takes
    why: str


def _text(value: str) -> str:
    return value


FLAGS = (
    ForeignFlag("enable_profiler", boolean, SAME, False,
                "no TensorFlow profiler service is offered"),
    ForeignFlag("enable_per_model_batching_parameters", boolean, SAME, False,
                "every model batches by the one --batching_parameters_file"),
    ForeignFlag("grpc_max_threads", int, SAME, None,
                "gRPC requests are read on the server's event loop, not a sized thread pool"),
    ForeignFlag("rest_api_num_threads", int, SAME, None,
                "REST requests are read on the server's event loop, not a sized thread pool"),
    ForeignFlag("num_unload_threads", int, SAME, 0, "versions are unloaded one at a time"),
    ForeignFlag("per_process_gpu_memory_fraction", float, SAME, 0.0,
                "TensorFlow sizes its GPU memory itself"),
    ForeignFlag("saved_model_tags", _text, SAME, "serve",
                "models load the meta graph tagged 'serve'"),
    ForeignFlag("tensorflow_session_config_file", _text, SAME, "",
                "no session ConfigProto file is read (the thread flags size the pools)"),
    ForeignFlag("thread_pool_factory_config_file", _text, SAME, "",
                "TensorFlow's own thread pools run the models"),
    ForeignFlag("mixed_precision", _text, SAME, "",
                "models run in the precision they were exported in"),
    ForeignFlag("xla_cpu_compilation_enabled", boolean, SAME, False,
                "nothing is compiled with XLA beyond what the model itself asks for"),
    ForeignFlag("xla_gpu_compilation_enabled", boolean, SAME, False,
                "nothing is compiled with XLA beyond what the model itself asks for"),
    ForeignFlag("flush_filesystem_caches", boolean, MOOT, None, "no file-system caches"),
    ForeignFlag("remove_unused_fields_from_bundle_metagraph", boolean, MOOT, None,
                "no meta graph is kept after loading"),
    ForeignFlag("skip_initialize_tpu", boolean, MOOT, None, "no TPU"),
    ForeignFlag("platform_config_file", _text, REFUSED, "",
                "only TensorFlow SavedModels (and their TFLite files) are served; run TF "
                "Serving for other platforms"),
    ForeignFlag("use_alts_credentials", boolean, REFUSED, False,
                "ALTS credentials exist only on Google Cloud; use --ssl_config_file"),
)  # fmt: skip


def add_to(parser: argparse.ArgumentParser) -> None:
    """Register every flag of FLAGS as TF Serving spells it (`--name=value`; a bare boolean is
    true). Unset flags stay None, so only what the command line gave is acted on."""
    group = parser.add_argument_group("TF Serving flags the embedded server takes as they are")
    for flag in FLAGS:
        extra = {"nargs": "?", "const": True} if flag.parse is boolean else {}
        group.add_argument(
            f"--{flag.name}",
            dest=flag.name,
            type=flag.parse,
            default=None,
            metavar="VALUE",
            help=f"embedded server: {flag.why}",
            **extra,
        )


def given(args: argparse.Namespace) -> dict[str, object]:
    """The flags of FLAGS the command line set, by name."""
    return {
        flag.name: getattr(args, flag.name)
        for flag in FLAGS
        if getattr(args, flag.name) is not None
    }


def refusal(args: argparse.Namespace) -> str | None:
    """One line for the first flag asking for what the embedded server cannot do, else None."""
    values = given(args)
    for flag in FLAGS:
        if flag.kind == REFUSED and flag.name in values and values[flag.name] != flag.behaviour:
            return f"--{flag.name}={_spelled(values[flag.name])} cannot be honoured: {flag.why}"
    return None


def notices(args: argparse.Namespace) -> list[str]:
    """A warning line for each flag given a value the embedded server does not act as."""
    values = given(args)
    lines = []
    for flag in FLAGS:
        if flag.kind != SAME or flag.name not in values or values[flag.name] == flag.behaviour:
            continue
        lines.append(
            f"--{flag.name}={_spelled(values[flag.name])} has no effect in the embedded server: "
            f"{flag.why}"
        )
    return lines


def passed_on(args: argparse.Namespace) -> list[str]:
    """The flags given, as arguments for the real tensorflow_model_server."""
    return [f"--{name}={_spelled(value)}" for name, value in given(args).items()]


def _spelled(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
