"""`convstack predict`, `convstack status` and `convstack metadata`.

`predict` classifies PNG/JPEG files (any size, preprocessed to the model's input) or the rows of
a .npy file, through a server (`--target`) or in-process from an exported version
(`--saved-model DIR`, or its Keras-native `--keras FILE`: the only paths that import the
TensorFlow runtime), and prints the same table either way. Failures (a missing file, an
unreadable image, an unreachable server, a server error) print one line on stderr and exit 1;
usage errors exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from convstack.client.errors import PredictionError
from convstack.common.flags import positive_number

__all__ = ["metadata_main", "predict_main", "status_main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
DEFAULT_TARGET = "localhost:8500"
# Rows per request (and per in-process call): one request per row would be slow, one for a
# 10,000-row .npy file too large.
CHUNK_ROWS = 64


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to /dev/null for a while: TensorFlow 2.21 writes start-up lines
    there at import whatever TF_CPP_MIN_LOG_LEVEL says, which would bury the one-line errors."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _import_client():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():
        import convstack.client.sync_client as sync_client
    return sync_client


class _Failure(Exception):
    """A one-line error for the user."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(error: PredictionError) -> str:
    if "file" in error.details:  # image errors already name their file
        return error.message
    if "target" in error.details:
        return f"{error.details['target']}: {error}"
    return str(error)


def _run(prog: str, action) -> int:
    try:
        return action()
    except PredictionError as error:
        message = _describe(error)
    except _Failure as error:
        message = str(error)
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_ERROR


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]):
    """Parsed arguments, or the exit status argparse chose (2 for usage errors, 0 for --help)."""
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)


# --- shared flags ---------------------------------------------------------------------------


def _add_server_flags(parser: argparse.ArgumentParser, *, labels: bool = True) -> None:
    parser.add_argument("--target", help=f"gRPC address of the server (default {DEFAULT_TARGET})")
    parser.add_argument("--model", help="model name on the server")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--version", type=int, help="a specific version")
    if labels:
        pick.add_argument("--label", help="a version label, e.g. stable or canary")
    parser.add_argument(
        "--timeout", type=positive_number, default=10.0, help="seconds per call (10)"
    )
    tls = parser.add_argument_group("TLS (any of these turns it on)")
    tls.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    tls.add_argument("--tls-ca", metavar="PEM", help="root certificates to verify the server")
    tls.add_argument("--tls-cert", metavar="PEM", help="client certificate chain (mutual TLS)")
    tls.add_argument("--tls-key", metavar="PEM", help="client private key (mutual TLS)")
    tls.add_argument("--tls-server-name", metavar="NAME", help="expected name in the server cert")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _tls_wanted(args) -> bool:
    return bool(args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name)


def _open_client(args, *, signature: str = "serving_default", label: str | None = None):
    sync_client = _import_client()
    from convstack.client.connection import TlsConfig

    try:
        tls = None
        if _tls_wanted(args):
            tls = TlsConfig(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        return sync_client.PredictionClient(
            args.target or DEFAULT_TARGET,
            args.model,
            version=args.version,
            version_label=label,
            signature=signature,
            timeout=args.timeout,
            tls=tls,
        )
    except ValueError as exc:  # e.g. an unreadable certificate file
        raise _Failure(str(exc)) from None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


# --- predict --------------------------------------------------------------------------------


def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack predict",
        description="Classify PNG/JPEG files (any size; resized to the model's input) or the "
        "rows of a .npy file, through a server or in-process from an exported version.",
    )
    _add_server_flags(parser)
    parser.add_argument(
        "--saved-model", metavar="DIR", help="run in-process from this exported version instead"
    )
    parser.add_argument(
        "--keras",
        metavar="FILE",
        help="run in-process from this Keras model file instead (an exported version's "
        "assets.extra/model.keras): keras.models.load_model, softmax and argmax of its logits",
    )
    parser.add_argument("--signature", default="serving_default", help="(serving_default)")
    parser.add_argument("--npy", metavar="FILE", help="a .npy array of inputs instead of images")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="PNG or JPEG files")
    return parser


def _check_predict_args(parser, args) -> None:
    if bool(args.images) == bool(args.npy):
        parser.error("give IMAGE files or --npy FILE (one of them)")
    if args.saved_model and args.keras:
        parser.error("give --saved-model DIR or --keras FILE, not both")
    local = "--saved-model" if args.saved_model else "--keras" if args.keras else None
    if local:
        server_only = [args.target, args.model, args.version, args.label, _tls_wanted(args)]
        if any(value not in (None, False) for value in server_only):
            parser.error(f"{local} runs without a server: drop the server flags")
        if args.keras and args.signature != "serving_default":
            parser.error("--keras has no signatures: drop --signature")
    elif not args.model:
        parser.error("--model is required (or --saved-model DIR, or --keras FILE)")


def _single_input(spec, where: str):
    if len(spec.inputs) != 1:
        raise _Failure(
            f"{where}: signature {spec.name!r} has inputs {', '.join(sorted(spec.inputs))}; "
            "predict feeds exactly one"
        )
    return next(iter(spec.inputs.items()))


def _load_npy(path: str, input_spec) -> tuple[list[str], np.ndarray]:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise _Failure(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise _Failure(f"{path}: not a readable .npy array: {exc}") from None
    if input_spec.shape is not None and array.ndim == len(input_spec.shape) - 1:
        array = array[None]  # one example without its batch axis
    if input_spec.dtype != "string" and array.dtype.kind in "biuf":
        target = np.dtype(input_spec.dtype)
        if array.dtype != target and np.can_cast(array.dtype, target, "same_kind"):
            array = array.astype(target)
    return [f"{path}[{index}]" for index in range(len(array))], array


def _load_files(paths: Sequence[str], input_spec) -> np.ndarray:
    from convstack.client.images import load_images

    if input_spec.dtype == "string":  # e.g. predict_image_bytes: the graph decodes the files
        return np.array([_read_bytes(path) for path in paths] or [], dtype=object)
    return load_images(paths, input_spec.shape, input_spec.dtype)


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise _Failure(f"{path}: no such file") from None
    except OSError as exc:
        raise _Failure(f"{path}: cannot read: {exc.strerror or exc}") from None


def _inputs(args, input_spec) -> tuple[list[str], np.ndarray]:
    if args.npy:
        return _load_npy(args.npy, input_spec)
    return list(args.images), _load_files(args.images, input_spec)


def _chunks(array: np.ndarray):
    for start in range(0, len(array), CHUNK_ROWS):
        yield array[start : start + CHUNK_ROWS]


def _rows(names, outputs: dict, version, label) -> list[dict]:
    classes = outputs.get("classes")
    probabilities = outputs.get("probabilities")
    if classes is None and probabilities is None:
        raise _Failure(
            f"the signature's outputs ({', '.join(sorted(outputs))}) have neither 'classes' "
            "nor 'probabilities'"
        )
    rows = []
    for index, name in enumerate(names):
        if classes is not None:
            predicted = int(classes[index])
        else:
            predicted = int(np.argmax(probabilities[index]))
        probability = None if probabilities is None else float(probabilities[index][predicted])
        rows.append(
            {
                "file": name,
                "class": predicted,
                "probability": probability,
                "version": version[index] if isinstance(version, list) else version,
                "label": label[index] if isinstance(label, list) else label,
            }
        )
    return rows


def _predict_server(args) -> tuple[list[dict], dict]:
    with _open_client(args, signature=args.signature, label=args.label) as client:
        signatures = client.metadata()
        if args.signature not in signatures:
            known = ", ".join(sorted(signatures))
            raise _Failure(f"model {args.model!r} has no signature {args.signature!r} ({known})")
        from convstack.client.signature import SignatureSpec

        spec = SignatureSpec.from_dict(args.signature, signatures[args.signature])
        name, input_spec = _single_input(spec, args.model)
        names, array = _inputs(args, input_spec)
        pieces, versions, labels = [], [], []
        for chunk in _chunks(array):
            prediction = client.predict({name: chunk})
            pieces.append(prediction.outputs)
            versions += [prediction.version] * len(chunk)
            labels += [prediction.label] * len(chunk)
    outputs = _concatenate(pieces)
    source = {"model": args.model, "target": args.target or DEFAULT_TARGET}
    return _rows(names, outputs, versions, labels), source


def _concatenate(pieces: list[dict]) -> dict:
    if not pieces:
        return {}
    return {key: np.concatenate([piece[key] for piece in pieces]) for key in pieces[0]}


def _load_saved_model(directory: str, signature: str):
    """The signature function of an exported version and its SignatureSpec."""
    if not Path(directory, "saved_model.pb").is_file():
        raise _Failure(f"{directory}: not a SavedModel directory (no saved_model.pb)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(directory)
        except Exception as exc:  # TF raises many types (OSError, ValueError, OpError...)
            raise _Failure(f"{directory}: cannot load the SavedModel: {exc}") from None
    function = loaded.signatures.get(signature)
    if function is None:
        known = ", ".join(sorted(loaded.signatures))
        raise _Failure(f"{directory}: no signature {signature!r} ({known})")
    from convstack.client.signature import SignatureSpec

    _, input_specs = function.structured_input_signature
    spec = SignatureSpec(
        signature,
        {key: _tf_spec(value) for key, value in input_specs.items()},
        {key: _tf_spec(value) for key, value in function.structured_outputs.items()},
    )
    return loaded, function, spec


def _tf_spec(spec):
    from convstack.client.signature import TensorSpec

    dims = spec.shape.as_list() if spec.shape.rank is not None else None
    shape = None if dims is None else tuple(-1 if d is None else d for d in dims)
    return TensorSpec(spec.dtype.name, shape)


def _predict_saved_model(args) -> tuple[list[dict], dict]:
    _import_client()
    from convstack.client.signature import prepare_inputs

    _loaded, function, spec = _load_saved_model(args.saved_model, args.signature)
    name, input_spec = _single_input(spec, args.saved_model)
    names, array = _inputs(args, input_spec)
    prepared = prepare_inputs(spec, {name: array})[name]
    import tensorflow as tf

    pieces = []
    for chunk in _chunks(prepared):
        outputs = function(**{name: tf.constant(chunk)})
        pieces.append({key: value.numpy() for key, value in outputs.items()})
    version_name = Path(args.saved_model).resolve().name
    version = int(version_name) if version_name.isdigit() else None
    source = {"saved_model": str(args.saved_model)}
    return _rows(names, _concatenate(pieces), version, None), source


def _load_keras(path: str):
    """keras.models.load_model of a .keras file, and the SignatureSpec of its one image input."""
    if not Path(path).is_file():
        raise _Failure(f"{path}: no such file")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():
        import keras

        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types on a bad archive
            raise _Failure(f"{path}: cannot load the Keras model: {_one_line(str(exc))}") from None
    from convstack.client.signature import SignatureSpec, TensorSpec

    shape = tuple(-1 if dim is None else dim for dim in model.input_shape)
    spec = SignatureSpec(
        "keras",
        {"images": TensorSpec("float32", shape)},
        {"probabilities": TensorSpec("float32", (-1, -1)), "classes": TensorSpec("int64", (-1,))},
    )
    return model, spec


def _predict_keras(args) -> tuple[list[dict], dict]:
    _import_client()
    from convstack.client.signature import prepare_inputs

    model, spec = _load_keras(args.keras)
    name, input_spec = _single_input(spec, args.keras)
    names, array = _inputs(args, input_spec)
    prepared = prepare_inputs(spec, {name: array})[name]
    import tensorflow as tf

    pieces = []
    for chunk in _chunks(prepared):
        logits = model(tf.constant(chunk), training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1).numpy()
        pieces.append({"probabilities": probabilities, "classes": probabilities.argmax(-1)})
    # <version>/assets.extra/model.keras names its version two levels up.
    version_name = Path(args.keras).resolve().parent.parent.name
    version = int(version_name) if version_name.isdigit() else None
    return _rows(names, _concatenate(pieces), version, None), {"keras": str(args.keras)}


def _print_predictions(rows: list[dict], source: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**source, "predictions": rows}, indent=2))
        return
    table = [(row["file"], row["class"], _probability(row["probability"])) for row in rows]
    print(_table(("FILE", "CLASS", "PROBABILITY"), table, right=(1, 2)))


def _probability(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def predict_main(argv: Sequence[str]) -> int:
    """`convstack predict`: see build_predict_parser()."""
    parser = build_predict_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    try:
        _check_predict_args(parser, args)
    except SystemExit as exit_:
        return int(exit_.code or 0)

    def action() -> int:
        run = (
            _predict_saved_model
            if args.saved_model
            else _predict_keras
            if args.keras
            else _predict_server
        )
        rows, source = run(args)
        _print_predictions(rows, source, args.json)
        return 0

    return _run("convstack predict", action)


# --- status and metadata --------------------------------------------------------------------


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack status", description="The versions of a model and their states."
    )
    _add_server_flags(parser, labels=False)
    return parser


def status_main(argv: Sequence[str]) -> int:
    """`convstack status --target HOST:PORT --model NAME [--version N] [--json]`."""
    return _model_command("convstack status", build_status_parser(), argv, _print_status)


def _print_status(args: argparse.Namespace) -> int:
    with _open_client(args) as client:
        statuses = client.status(args.version)
    if args.json:
        print(json.dumps({"model": args.model, "versions": statuses}, indent=2))
        return 0
    rows = [
        (
            s["version"],
            s["state"],
            s["error_code"] + (f": {s['error_message']}" if s["error_message"] else ""),
        )
        for s in statuses
    ]
    print(f"model {args.model}")
    print(_table(("VERSION", "STATE", "STATUS"), rows, right=(0,)))
    return 0


def build_metadata_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack metadata",
        description="The signatures of a model version: inputs and outputs with dtypes and "
        "shapes (-1: any size).",
    )
    _add_server_flags(parser)
    return parser


def _format_signatures(model: str, version: int, signatures: dict) -> str:
    lines = [f"model {model}, version {version}"]
    for name, signature in signatures.items():
        method = f" ({signature['method_name']})" if signature["method_name"] else ""
        lines.append(f"signature {name}{method}")
        rows = [
            (kind, key, spec["dtype"], "?" if spec["shape"] is None else str(spec["shape"]))
            for kind in ("inputs", "outputs")
            for key, spec in signature[kind].items()
        ]
        table = _table(("", "NAME", "DTYPE", "SHAPE"), rows, right=())
        lines += ["  " + line for line in table.splitlines()[1:]]
    return "\n".join(lines)


def metadata_main(argv: Sequence[str]) -> int:
    """`convstack metadata --target HOST:PORT --model NAME [--version N | --label L] [--json]`."""
    return _model_command("convstack metadata", build_metadata_parser(), argv, _print_metadata)


def _print_metadata(args: argparse.Namespace) -> int:
    with _open_client(args, label=args.label) as client:
        signatures = client.metadata()
        version = client.served_version()
    if args.json:
        document = {"model": args.model, "version": version, "signatures": signatures}
        print(json.dumps(document, indent=2))
    else:
        print(_format_signatures(args.model, version, signatures))
    return 0


def _model_command(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    report: Callable[[argparse.Namespace], int],
) -> int:
    """Parse the flags of a command that asks a server about one model, then run `report`."""
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    if not args.model:
        return _usage(parser, "--model is required")
    return _run(prog, lambda: report(args))


def _usage(parser: argparse.ArgumentParser, message: str) -> int:
    try:
        parser.error(message)
    except SystemExit as exit_:
        return int(exit_.code or EXIT_USAGE)
    return EXIT_USAGE
