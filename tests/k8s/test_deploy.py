"""What `convstack k8s deploy` applies and how it reads a Deployment's rollout
(convstack/k8s/deploy.py), on the rendered overlays and plain dicts."""

from __future__ import annotations

import pytest

from convstack.k8s.deploy import field_owners, rollout_state, serving_objects, serving_stack

SERVING_CONFIG = "convstack-serving-config"


def test_serving_objects_leave_training_out(rendered):
    chosen = serving_objects(rendered["multiworker"])
    assert chosen[0]["kind"] == "Namespace"
    names = {(o["kind"], o["metadata"]["name"]) for o in chosen}
    assert ("Service", "convstack-train-mw") not in names
    assert not any(kind == "Job" or name.startswith("convstack-tf-config") for kind, name in names)
    assert ("ConfigMap", SERVING_CONFIG) in names


def test_deploy_applies_the_rollout_access_but_not_the_rollout_job(rendered):
    names = {(o["kind"], o["metadata"]["name"]) for o in serving_objects(rendered["local"])}
    assert {("ServiceAccount", "convstack-rollout"), ("Role", "convstack-rollout"),
            ("RoleBinding", "convstack-rollout")} <= names  # fmt: skip
    assert ("Job", "convstack-rollout") not in names


def test_the_serving_stack_goes_into_the_namespace_given(rendered):
    stack, deployment = serving_stack(rendered["local"], "team-a")
    assert deployment == "convstack-serving"
    assert stack[0]["metadata"]["name"] == "team-a"
    assert {o["metadata"].get("namespace") for o in stack[1:]} == {"team-a"}


def deployment(*, observed: int = 3, desired: int | None = None, **status) -> dict:
    """Deployment d at generation 3 whose controller has seen generation `observed`."""
    return {
        "metadata": {"name": "d", "namespace": "ns", "generation": 3},
        "spec": {} if desired is None else {"replicas": desired},
        "status": {"observedGeneration": observed, **status},
    }


DEADLINE_EXCEEDED = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": "timed out",
}


@pytest.mark.parametrize(
    ("the_deployment", "done", "failed", "phrase"),
    [
        (deployment(observed=2), False, False, "waiting for the controller"),
        (
            deployment(desired=3, replicas=3, updatedReplicas=1),
            False,
            False,
            "1 of 3 replicas updated",
        ),
        (
            deployment(desired=2, replicas=3, updatedReplicas=2),
            False,
            False,
            "1 old replica(s) terminating",
        ),
        (
            deployment(desired=2, replicas=2, updatedReplicas=2, availableReplicas=1),
            False,
            False,
            "1 of 2 updated replicas available",
        ),
        (
            deployment(desired=2, replicas=2, updatedReplicas=2, availableReplicas=2),
            True,
            False,
            "is available: 2/2",
        ),
        (
            deployment(conditions=[DEADLINE_EXCEEDED]),
            True,
            True,
            "progress deadline: timed out",
        ),
    ],
)
def test_rollout_state(the_deployment, done, failed, phrase):
    state = rollout_state(the_deployment)
    assert (state.done, state.failed) == (done, failed)
    assert phrase in state.message


def test_field_owners_reads_managed_fields():
    obj = {
        "metadata": {
            "managedFields": [
                {"manager": "convstack", "fieldsV1": {"f:data": {"f:batching.config": {}}}},
                {"manager": "convstack-rollout", "fieldsV1": {"f:data": {"f:models.config": {}}}},
            ]
        }
    }
    assert field_owners(obj, "data", "models.config") == ["convstack-rollout"]
    assert field_owners(obj, "data", "other") == []
