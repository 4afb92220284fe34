"""What `convstack k8s rollout` creates, decided without a cluster: a copy of the overlay's
rollout Job template (k8s/base/rollout) under a unique name, unsuspended, with the image and the
rollout command's arguments (the template's --model/--store/--servers/--model-repository kept
unless given)."""

from __future__ import annotations

from dataclasses import dataclass

from convstack.k8s.errors import LaunchError
from convstack.k8s.objects import flag_names, in_namespace, is_rollout, named_container

ROLLOUT_CONTAINER = "rollout"
DEFAULT_NAME_PREFIX = "convstack-rollout"


@dataclass
class RolloutPlan:
    """What `rollout` creates: one Job in `namespace`. The ServiceAccount, Role and RoleBinding
    it runs as come with the overlay and must exist already."""

    namespace: str
    job: dict


def rollout_template(objects: list[dict]) -> dict:
    """The overlay's one rollout Job; LaunchError when it has none (or several)."""
    jobs = [o for o in objects if o["kind"] == "Job" and is_rollout(o)]
    if len(jobs) != 1:
        raise LaunchError(
            f"expected one rollout Job in the overlay (k8s/base/rollout), found {len(jobs)}"
        )
    return jobs[0]


def rollout_container(job: dict) -> dict:
    """The Job's rollout container; LaunchError when it has none."""
    found = named_container(job["spec"]["template"]["spec"], ROLLOUT_CONTAINER)
    if found is None:
        raise LaunchError(f"Job {job['metadata']['name']} has no container {ROLLOUT_CONTAINER!r}")
    return found


def merge_rollout_args(template: list[str], given: list[str]) -> list[str]:
    """`convstack rollout` arguments: the given verb and its operands (else the template's),
    the given flags, then the template's flags that were not given (all `--flag=value`)."""
    template_words, template_flags = _split_words(template)
    given_words, given_flags = _split_words(given)
    names = flag_names(given_flags)
    kept = [a for a in template_flags if not (flag_names([a]) & names)]
    return [*(given_words or template_words), *given_flags, *kept]


def _split_words(args: list[str]) -> tuple[list[str], list[str]]:
    """The leading words (verb, version) and the flags after them."""
    for at, arg in enumerate(args):
        if arg.startswith("-"):
            return args[:at], args[at:]
    return list(args), []


def plan_rollout(
    objects: list[dict],
    *,
    name: str,
    image: str | None,
    rollout_args: list[str],
    namespace: str,
) -> RolloutPlan:
    """The overlay's rollout Job renamed `name`, unsuspended, running `image` (default: the
    template's) with `rollout_args` merged into the template's arguments."""
    job = in_namespace(rollout_template(objects), namespace)
    job["metadata"]["name"] = name
    job["spec"].pop("suspend", None)  # the template is suspended so that applying it runs nothing
    container = rollout_container(job)
    if image:
        container["image"] = image
    container["args"] = merge_rollout_args(list(container.get("args") or []), rollout_args)
    return RolloutPlan(namespace, job)


def rollout_words(job: dict) -> str:
    """`convstack rollout VERB [VERSION]` of a planned or running rollout Job."""
    words, _ = _split_words(list(rollout_container(job).get("args") or []))
    return " ".join(["convstack rollout", *words])
