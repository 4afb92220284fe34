#!/bin/sh
# Entrypoint of a multi-worker training pod: build TF_CONFIG for MultiWorkerMirroredStrategy,
# then exec the trainer (so it is PID 1 and receives SIGTERM itself).
#
# Inputs (environment, set in the Job's pod template):
#   JOB_COMPLETION_INDEX  this pod's index (0..NUM_WORKERS-1); index 0 is the chief
#   JOB_NAME              the Job's name; Kubernetes names an Indexed Job's pods <job>-<index>
#   SERVICE_NAME          the headless Service named in the pod's spec.subdomain
#   NUM_WORKERS           the Job's parallelism (= completions)
#   WORKER_PORT           the port every worker's TensorFlow server listens on
# Every worker lists the same cluster, worker i at <job>-<i>.<service>:<port>, and names its
# own index. A malformed input exits 2, which the Job's podFailurePolicy turns into FailJob.
set -eu

fail() {
    echo "tf-config: $*" >&2
    exit 2
}

is_number() {
    case "$1" in
        '' | *[!0-9]*) return 1 ;;
        *) return 0 ;;
    esac
}

is_dns_name() {
    case "$1" in
        '' | *[!a-z0-9.-]*) return 1 ;;
        *) return 0 ;;
    esac
}

index="${JOB_COMPLETION_INDEX:-}"
job="${JOB_NAME:-}"
service="${SERVICE_NAME:-}"
workers="${NUM_WORKERS:-}"
port="${WORKER_PORT:-}"

is_number "$index" || fail "JOB_COMPLETION_INDEX must be a number, got '$index'"
is_number "$workers" && [ "$workers" -ge 1 ] || fail "NUM_WORKERS must be >= 1, got '$workers'"
[ "$index" -lt "$workers" ] || fail "JOB_COMPLETION_INDEX $index is not below NUM_WORKERS $workers"
is_dns_name "$job" || fail "JOB_NAME must be a DNS name, got '$job'"
is_dns_name "$service" || fail "SERVICE_NAME must be a DNS name, got '$service'"
is_number "$port" || fail "WORKER_PORT must be a number, got '$port'"

hosts=""
i=0
while [ "$i" -lt "$workers" ]; do
    hosts="${hosts}${hosts:+,}\"${job}-${i}.${service}:${port}\""
    i=$((i + 1))
done

TF_CONFIG="{\"cluster\":{\"worker\":[${hosts}]},\"task\":{\"type\":\"worker\",\"index\":${index}}}"
export TF_CONFIG
echo "tf-config: TF_CONFIG=${TF_CONFIG}" >&2
exec "$@"
