"""`convstack VERB ...`: dispatches to the command of each package, importing only that one
(so that, say, `convstack predict` never pays for importing the trainer)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

# verb -> (module, function, one-line help). Nested verbs use "verb subverb".
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("convstack.trainer.cli", "train_main", "train the Conv2D model and export a version"),
    "data": ("convstack.trainer.data_cli", "data_main", "dataset tools: to-tfrecord"),
    "serve": (
        "convstack.serving.cli",
        "serve_main",
        "serve models over TF Serving's gRPC and REST APIs",
    ),
    "models-config": (
        "convstack.serving.cli",
        "models_config_main",
        "write or edit a models.config",
    ),
    "predict": (
        "convstack.client.cli",
        "predict_main",
        "classify images via a server or a SavedModel",
    ),
    "status": ("convstack.client.cli", "status_main", "versions of a model and their states"),
    "metadata": (
        "convstack.client.cli",
        "metadata_main",
        "signatures of a model: inputs, outputs, shapes",
    ),
    "bench train": (
        "convstack.bench.train",
        "bench_main",
        "custom loop vs model.fit, 1 vs 2 replicas",
    ),
    "bench client": (
        "convstack.bench.client",
        "bench_main",
        "load generator: throughput, latency, codec",
    ),
    "loadgen": ("convstack.bench.client", "bench_main", "the same as bench client"),
    "bench footprint": (
        "convstack.bench.footprint",
        "bench_main",
        "the client's import time and installed size vs tensorflow-serving-api",
    ),
    "bench infer": (
        "convstack.bench.infer",
        "bench_main",
        "in-process inference: SavedModel, XLA, TFLite, Keras; batch 1 and 32",
    ),
    "bench serve": (
        "convstack.bench.serve",
        "bench_main",
        "in-process vs gRPC/REST, batching on and off",
    ),
    "rollout": (
        "convstack.serving.rollout.cli",
        "rollout_main",
        "canary, promote, roll back, retire",
    ),
    "k8s render": ("convstack.k8s.render", "render_main", "render (and validate) a k8s/ overlay"),
    "k8s train": ("convstack.k8s.launch", "train_main", "run a training Job, stream its log"),
    "k8s deploy": ("convstack.k8s.launch", "deploy_main", "apply the serving stack and wait"),
    "k8s rollout": ("convstack.k8s.launch", "rollout_main", "run convstack rollout in a Job"),
}


# The extra each verb needs beyond the base install (the client); verbs not named need none.
# Matched by the verb's first word unless the whole verb is listed.
EXTRAS: dict[str, str] = {
    "train": "training",
    "data": "training",
    "bench train": "training",
    "bench infer": "serving",
    "serve": "serving",
    "models-config": "serving",
    "bench serve": "serving",
    "rollout": "serving",
    "k8s": "k8s",
}
# Top-level modules that only an extra installs, and which one: a base verb that reaches one
# (`convstack predict --saved-model` loads TensorFlow) names the extra that brings it.
EXTRA_MODULES: dict[str, str] = {
    "PIL": "images",
    "tensorflow": "training",
    "sklearn": "training",
    "tensorboard": "training",
    "matplotlib": "training",
    "tqdm": "training",
    "tensorflow_serving": "serving",
    "prometheus_client": "serving",
    "grpc_health": "serving",
    "kubernetes": "k8s",
    "pydantic": "k8s",
    "yaml": "k8s",
}


# The module whose absence means an extra is not installed, checked before a verb starts (its
# imports may be lazy: `convstack serve --help` would work, then the server would not).
EXTRA_PROBES: dict[str, str] = {
    "training": "tensorflow",
    "serving": "tensorflow_serving",
    "k8s": "kubernetes",
}


def verb_extra(verb: str) -> str | None:
    """The extra `verb` needs, or None for a verb of the base install."""
    return EXTRAS.get(verb) or EXTRAS.get(verb.split()[0])


def extra_installed(extra: str) -> bool:
    probe = EXTRA_PROBES.get(extra)
    return probe is None or importlib.util.find_spec(probe) is not None


def missing_extra(verb: str, error: ModuleNotFoundError) -> str | None:
    """The extra to install when running `verb` failed on `error`, or None when the missing
    module is not one an extra installs (a real bug, left to raise)."""
    top = (error.name or "").partition(".")[0]
    if top not in EXTRA_MODULES:
        return None
    return verb_extra(verb) or EXTRA_MODULES[top]


def _needs(verb: str, extra: str, module: str) -> int:
    print(
        f"convstack {verb}: needs the '{extra}' extra (no module {module!r}): "
        f"pip install 'convstack[{extra}]'",
        file=sys.stderr,
    )
    return 2


def usage() -> str:
    width = max(len(verb) for verb in COMMANDS)
    lines = ["usage: convstack VERB [options]   (convstack VERB --help for each)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_text}" for verb, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]] | None:
    """The command named by argv's first words, and the arguments left for it."""
    for words in (2, 1):
        verb = " ".join(argv[:words])
        if len(argv) >= words and verb in COMMANDS:
            return verb, argv[words:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    resolved = resolve(argv)
    if resolved is None:
        print(f"convstack: unknown command {' '.join(argv[:2])!r}\n\n{usage()}", file=sys.stderr)
        return 2
    verb, rest = resolved
    module_name, function_name, _ = COMMANDS[verb]
    extra = verb_extra(verb)
    if extra is not None and not extra_installed(extra):
        return _needs(verb, extra, EXTRA_PROBES[extra])
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        return function(rest)
    except ModuleNotFoundError as error:
        extra = missing_extra(verb, error)
        if extra is None:
            raise
        return _needs(verb, extra, error.name)


if __name__ == "__main__":
    sys.exit(main())
