"""What an SRE checks before accepting the manifests, asserted on every rendered overlay:
hardening, probes and resources, selectors and ports that agree, pinned images, a serving
ConfigMap TF Serving can read, and training Jobs whose failure policy matches the trainer's
exit codes."""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath

import pytest

from convstack.common.configs import build_config
from convstack.serving import batching, metrics, model_config
from convstack.serving.cli import build_serve_parser
from convstack.trainer import cli as trainer_cli
from convstack.trainer.config import TrainConfig
from convstack.trainer.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED
from tests.k8s.conftest import GPU_OVERLAYS, OVERLAYS
from tests.k8s.manifests import (
    all_containers,
    by_kind,
    container,
    container_port,
    flags,
    mount_holding,
    one,
    pod_spec,
    pod_template,
    selects,
    service_selects,
    volume,
    workloads,
)

SERVING_CONTAINER = "tensorflow-serving"
ROLLOUT_JOB = ROLLOUT_ACCOUNT = "convstack-rollout"
TRAINER_CONTAINER = "trainer"


def image_tag(image: str) -> str | None:
    """The tag of `registry[:port]/path/name:tag[@digest]`, or None."""
    last_component = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last_component.partition(":")[2] or None


def serving(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "convstack-serving")


def serving_container(objects: list[dict]) -> dict:
    return container(serving(objects), SERVING_CONTAINER)


def serving_flags(objects: list[dict]) -> dict:
    return flags(serving_container(objects)["args"])


def jobs(objects: list[dict]) -> list[dict]:
    """The training Jobs (the rollout Job has its own tests in test_rollout_policy)."""
    return [j for j in by_kind(objects, "Job") if j["metadata"]["name"] != ROLLOUT_JOB]


def config_map_for(workload: dict, container_spec: dict, path: str, objects: list[dict]):
    """(ConfigMap, key) serving the file at `path` inside `container_spec`, else fails."""
    mount = mount_holding(container_spec, path)
    assert mount is not None, f"nothing is mounted at {path}"
    source = volume(workload, mount["name"])
    assert "configMap" in source, f"{path} is not in a ConfigMap volume"
    config_map = one(objects, "ConfigMap", source["configMap"]["name"])
    key = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    assert key in config_map["data"], f"ConfigMap has no {key!r} for {path}"
    return config_map, key


# --- hardening: every container of every workload ------------------------------------------


def test_pods_run_as_non_root_with_the_runtime_seccomp_profile(overlay):
    _, objects = overlay
    for workload in workloads(objects):
        spec = pod_spec(workload)
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] != 0 and context["runAsGroup"] != 0
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        # Only the rollout Job talks to the API, as its own ServiceAccount (test_rollout_policy).
        assert spec["automountServiceAccountToken"] is (
            spec.get("serviceAccountName") == ROLLOUT_ACCOUNT
        )
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden)
        assert not any("hostPath" in v for v in spec.get("volumes", []))


def test_containers_drop_everything_and_cannot_escalate(overlay):
    _, objects = overlay
    for workload in workloads(objects):
        for spec in all_containers(workload):
            context = spec["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["runAsNonRoot"] is True
            assert not context.get("privileged")
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_read_only_containers_get_a_writable_bounded_tmp(overlay):
    _, objects = overlay
    for workload in workloads(objects):
        for spec in all_containers(workload):
            mount = mount_holding(spec, "/tmp")
            assert mount is not None and mount["mountPath"] == "/tmp"
            source = volume(workload, mount["name"])
            assert source["emptyDir"]["sizeLimit"]


def test_every_container_requests_cpu_and_memory_and_caps_memory(overlay):
    _, objects = overlay
    for workload in workloads(objects):
        for spec in all_containers(workload):
            resources = spec["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"])
            assert "memory" in resources["limits"]


def test_long_running_containers_have_startup_liveness_and_readiness_probes(overlay):
    # Jobs' containers are batch work: their health is the exit code, which podFailurePolicy
    # reads; a probe would only kill a long training step.
    _, objects = overlay
    for workload in by_kind(objects, "Deployment"):
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in spec, f"{spec['name']} has no {probe}"


def test_images_are_pinned_to_a_release_tag(overlay):
    _, objects = overlay
    for workload in workloads(objects):
        for spec in all_containers(workload):
            tag = image_tag(spec["image"])
            assert tag, f"{spec['image']!r} has no tag"
            assert not tag.startswith("latest"), spec["image"]
            assert spec["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize("name", OVERLAYS)
def test_gpu_overlays_ask_for_gpus_and_tolerate_gpu_taints(rendered, name):
    objects = rendered[name]
    gpu = name in GPU_OVERLAYS
    serving_image = serving_container(objects)["image"]
    assert serving_image == (
        "tensorflow/serving:2.20.0-gpu" if gpu else "tensorflow/serving:2.20.0"
    )
    for workload in workloads(objects):
        # The rollout Job runs on CPU (with the overlay's build of the trainer image).
        on_gpu = gpu and workload["metadata"]["name"] != ROLLOUT_JOB
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            assert ("nvidia.com/gpu" in spec["resources"].get("limits", {})) == on_gpu
            assert spec["image"].endswith("-gpu") == gpu
        tolerations = pod_spec(workload).get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations) == on_gpu
    for job in jobs(objects):
        # NCCL between the GPUs of a pod needs more than the default 64 MiB /dev/shm.
        shm = mount_holding(container(job, TRAINER_CONTAINER), "/dev/shm")
        assert (
            shm is not None and volume(job, shm["name"])["emptyDir"]["medium"] == "Memory"
        ) == gpu


# --- selectors and ports ---------------------------------------------------------------------


def test_services_select_exactly_their_workloads_pods(overlay):
    _, objects = overlay
    for service in by_kind(objects, "Service"):
        selected = [
            w
            for w in workloads(objects)
            if service_selects(service, pod_template(w)["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)}"
        for port in service["spec"]["ports"]:
            assert any(
                _resolves(c, port["targetPort"]) for c in pod_spec(selected[0])["containers"]
            ), f"Service {service['metadata']['name']} targets missing port {port['targetPort']}"


def _resolves(spec: dict, port) -> bool:
    return any(p["containerPort"] == port or p.get("name") == port for p in spec.get("ports", []))


def test_serving_selectors_match_their_pods(overlay):
    _, objects = overlay
    deployment = serving(objects)
    labels = pod_template(deployment)["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"], labels)
    for constraint in pod_spec(deployment)["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"], labels)
    topology_keys = {c["topologyKey"] for c in pod_spec(deployment)["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in topology_keys


def test_serving_ports_agree_between_flags_container_services_and_probes(overlay):
    _, objects = overlay
    spec = serving_container(objects)
    args = serving_flags(objects)
    grpc_port, rest_port = int(args["port"]), int(args["rest_api_port"])
    assert container_port(spec, "grpc") == grpc_port
    assert container_port(spec, "http") == rest_port

    rest = one(objects, "Service", "convstack-serving")
    assert rest["spec"]["type"] == "ClusterIP"
    assert [container_port(spec, p["targetPort"]) for p in rest["spec"]["ports"]] == [rest_port]
    headless = one(objects, "Service", "convstack-serving-grpc")
    assert headless["spec"]["clusterIP"] == "None"  # DNS lists pods: client-side round_robin
    assert [container_port(spec, p["targetPort"]) for p in headless["spec"]["ports"]] == [grpc_port]

    for probe in ("startupProbe", "livenessProbe"):
        assert container_port(spec, spec[probe]["tcpSocket"]["port"]) == grpc_port
    assert readiness_arguments(spec)["port"] == rest_port

    annotations = pod_template(serving(objects))["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == rest_port


def readiness_arguments(spec: dict) -> dict:
    """The readiness probe is `bash -c SCRIPT NAME PORT MODEL` (see deployment.yaml)."""
    command = spec["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["/bin/bash", "-c"] and len(command) == 6, shlex.join(command)
    return {"script": command[2], "port": int(command[4]), "model": command[5]}


def test_readiness_probe_checks_the_available_state_of_a_served_model(overlay):
    _, objects = overlay
    spec = serving_container(objects)
    probe = readiness_arguments(spec)
    assert '"AVAILABLE"' in probe["script"]
    config_map, key = config_map_for(
        serving(objects), spec, serving_flags(objects)["model_config_file"], objects
    )
    config = model_config.parse_model_config(config_map["data"][key])
    assert probe["model"] in [m.name for m in config.model_config_list.config]


def test_hpa_owns_the_replica_count_of_the_serving_deployment(overlay):
    _, objects = overlay
    deployment = serving(objects)
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # A `replicas` in the manifest would reset the autoscaler's choice on every apply.
    assert "replicas" not in deployment["spec"]
    # Utilization targets are relative to requests.
    assert "cpu" in serving_container(objects)["resources"]["requests"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --- the serving ConfigMap -------------------------------------------------------------------


def test_serving_flags_are_valid_tf_serving_flags(overlay):
    _, objects = overlay
    spec = serving_container(objects)
    assert spec["command"] == ["/usr/bin/tensorflow_model_server"]
    # `convstack serve` accepts exactly TF Serving's flag names: a misspelt one fails here.
    parser = build_serve_parser()
    parser.allow_abbrev = False  # TF Serving takes no abbreviations
    parsed = parser.parse_args(spec["args"])
    assert parsed.allow_version_labels_for_unavailable_models
    assert parsed.enable_batching
    assert parsed.model_config_file_poll_wait_seconds > 0
    assert parsed.file_system_poll_wait_seconds > 0
    assert parsed.model_name is None and parsed.model_base_path is None


def test_config_files_come_from_a_config_map_mounted_as_a_directory(overlay):
    _, objects = overlay
    deployment = serving(objects)
    spec = serving_container(objects)
    args = serving_flags(objects)
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        config_map, _ = config_map_for(deployment, spec, args[flag], objects)
        # The rollout commands edit it in place and look it up by this name.
        assert config_map["metadata"]["name"] == "convstack-serving-config"
    for workload in workloads(objects):
        for container_spec in all_containers(workload):
            for mount in container_spec.get("volumeMounts", []):
                if "configMap" in volume(workload, mount["name"]):
                    # A subPath mount is a copy taken at start: it never sees an update.
                    assert "subPath" not in mount and "subPathExpr" not in mount
                    assert mount["readOnly"] is True


def test_models_config_parses_and_its_base_paths_are_on_the_model_volume(overlay):
    _, objects = overlay
    deployment = serving(objects)
    spec = serving_container(objects)
    config_map, key = config_map_for(
        deployment, spec, serving_flags(objects)["model_config_file"], objects
    )
    config = model_config.parse_model_config(config_map["data"][key], source=key)
    model_config.validate_model_config(config)
    models = list(config.model_config_list.config)
    assert models
    for model in models:
        mount = mount_holding(spec, model.base_path)
        assert mount is not None, f"{model.name}: {model.base_path} is not on a mounted volume"
        assert "persistentVolumeClaim" in volume(deployment, mount["name"])
        assert mount["readOnly"] is True


def test_batching_and_monitoring_configs_parse_and_match_the_scrape_path(overlay):
    _, objects = overlay
    deployment = serving(objects)
    spec = serving_container(objects)
    args = serving_flags(objects)
    config_map, key = config_map_for(deployment, spec, args["batching_parameters_file"], objects)
    assert batching.parse_batching_parameters(config_map["data"][key], key).max_batch_size >= 1
    config_map, key = config_map_for(deployment, spec, args["monitoring_config_file"], objects)
    monitoring = metrics.parse_monitoring_config(config_map["data"][key], key)
    assert monitoring.enable
    annotations = pod_template(deployment)["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == monitoring.path


def test_serving_reads_the_claim_training_writes(overlay):
    _, objects = overlay
    deployment = serving(objects)
    models_mount = mount_holding(serving_container(objects), "/models")
    served_claim = volume(deployment, models_mount["name"])["persistentVolumeClaim"]
    assert served_claim["readOnly"] is True
    for job in jobs(objects):
        trainer = container(job, TRAINER_CONTAINER)
        model_base = train_config(job).model_base
        mount = mount_holding(trainer, model_base)
        assert not mount.get("readOnly")
        claim = volume(job, mount["name"])["persistentVolumeClaim"]["claimName"]
        assert claim == served_claim["claimName"]
        assert model_base == models_mount["mountPath"]  # same paths in both pods


# --- training Jobs ---------------------------------------------------------------------------


def trainer_arguments(job: dict) -> list[str]:
    """What follows `convstack train` in the trainer container's command + args."""
    spec = container(job, TRAINER_CONTAINER)
    argv = [*spec["command"], *spec.get("args", [])]
    start = argv.index("convstack")
    assert argv[start + 1] == "train", shlex.join(argv)
    return argv[start + 2 :]


def train_config(job: dict) -> TrainConfig:
    """The TrainConfig `convstack train` would build from the Job's arguments."""
    parser = trainer_cli.build_parser()
    parser.allow_abbrev = False  # a flag the trainer would only guess at is a typo here
    namespace = parser.parse_args(trainer_arguments(job))
    return build_config(TrainConfig, namespace, None)


def test_trainer_arguments_are_valid_and_point_at_the_claims(overlay):
    _, objects = overlay
    assert jobs(objects)
    for job in jobs(objects):
        config = train_config(job)
        trainer = container(job, TRAINER_CONTAINER)
        for path in (config.model_base, config.run_dir):
            mount = mount_holding(trainer, path)
            assert mount is not None, f"{path} is not on a volume"
            assert "persistentVolumeClaim" in volume(job, mount["name"])
        assert config.replicas is None  # all GPUs the pod is given


def test_pod_failure_policy_fails_on_bad_input_and_ignores_preemption(overlay):
    _, objects = overlay
    for job in jobs(objects):
        spec = job["spec"]
        assert pod_spec(job)["restartPolicy"] == "Never"  # required by podFailurePolicy
        rules = spec["podFailurePolicy"]["rules"]
        fail_job = [r for r in rules if r["action"] == "FailJob"]
        assert [r["onExitCodes"] for r in fail_job] == [
            {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}
        ]
        ignored = [r for r in rules if r["action"] == "Ignore"]
        assert {"type": "DisruptionTarget", "status": "True"} in [
            c for r in ignored for c in r.get("onPodConditions", [])
        ]
        assert [EXIT_PREEMPTED] in [
            r["onExitCodes"]["values"] for r in ignored if "onExitCodes" in r
        ]
        # Rules apply in order: nothing may count a bad-input exit before FailJob sees it.
        assert rules.index(fail_job[0]) == 0
        assert spec["podReplacementPolicy"] == "Failed"
        assert spec["backoffLimit"] >= 1
        assert spec["activeDeadlineSeconds"] > 0
        assert spec["ttlSecondsAfterFinished"] > 0
        assert pod_spec(job)["terminationGracePeriodSeconds"] >= 30  # time to checkpoint


def test_restarted_training_pods_resume_from_the_same_run_directory(overlay):
    # The run directory is a fixed path on a claim, not per pod: a replacement pod finds the
    # checkpoints of the one it replaces.
    _, objects = overlay
    for job in jobs(objects):
        run_dir = train_config(job).run_dir
        assert "$(" not in run_dir
        mount = mount_holding(container(job, TRAINER_CONTAINER), run_dir)
        assert not mount.get("readOnly")
