#!/usr/bin/env bash
# `make image-check`: build the image here without a Docker engine and run it as a cluster would.
#
#   1. a stand-in for python:3.11-slim (debootstrap: Debian's python3.11, venv, pip), once;
#   2. `buildah bud --target cpu` and `--target gpu` on the Dockerfile as it is;
#   3. the cpu image, for each function: read-only root (a tmpfs /tmp, as an emptyDir would give),
#      every capability dropped, as UID 10001, in a network namespace with loopback only. Checked:
#      readiness, one binary CloudEvent answered with the function's result type, /metrics, SIGTERM
#      ending with exit code 0 and no crash in the log;
#   4. image sizes and cold starts (container start to readiness 200).
#
# Needs root (debootstrap, network namespaces) and minutes; not part of `make test`.
# TARGETS="cpu" skips the gpu build; FUNCTIONS="digits" checks fewer functions.
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
NETNS=onnxfn-check-$$
READY_TIMEOUT_S=60

say() { printf '== %s\n' "$*" >&2; }
fail() { printf 'image-check: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }

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
    ip netns del "$NETNS" 2>/dev/null || true
}
trap cleanup EXIT
probe() { ip netns exec "$NETNS" curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true; }

declare -A COLD_S
for function in $FUNCTIONS; do
    say "$function: run onnxfn:cpu read-only, uid 10001, no capabilities, loopback-only network"
    read -r ce_type body < <("$PYTHON" - "$function" <<'EOF'
import json, sys
from shared.contract import load_handler
handler = load_handler(sys.argv[1])
print(handler.config.accepts[0], json.dumps(handler.example(), separators=(",", ":")))
EOF
)
    "${PODMAN[@]}" rm -f -t 0 onnxfn-check >/dev/null 2>&1 || true
    started=$(now)
    "${PODMAN[@]}" run -d --name onnxfn-check --read-only --tmpfs /tmp:rw,size=64m,mode=1777 --cap-drop ALL \
        --security-opt no-new-privileges --network "ns:/run/netns/$NETNS" \
        --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
        -e "ONNXFN_FUNCTION=$function" "onnxfn:cpu" >/dev/null
    until [ "$(probe http://127.0.0.1:8080/health/readiness)" = 200 ]; do
        [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' onnxfn-check)" = true ] || {
            "${PODMAN[@]}" logs onnxfn-check | tail -20 >&2; fail "$function exited before ready"; }
        [ "$(echo "$(now) - $started > $READY_TIMEOUT_S" | bc)" = 0 ] || fail "$function not ready in ${READY_TIMEOUT_S} s"
        sleep 0.05
    done
    COLD_S[$function]=$(printf '%.2f' "$(echo "$(now) - $started" | bc)")
    user=$("${PODMAN[@]}" exec onnxfn-check id -u)
    [ "$user" = 10001 ] || fail "$function runs as uid $user, not 10001"
    answer=$(ip netns exec "$NETNS" curl -s -D - -o /dev/null --max-time 10 http://127.0.0.1:8080/ \
        -H 'Content-Type: application/json' -H 'Ce-Specversion: 1.0' -H 'Ce-Id: image-check-1' \
        -H 'Ce-Source: /onnxfn/image-check' -H "Ce-Type: $ce_type" --data "$body" | tr -d '\r')
    grep -q '^HTTP/1.1 200' <<<"$answer" || { echo "$answer" >&2; fail "$function did not answer 200"; }
    result_type=$(sed -n 's/^ce-type: //Ip' <<<"$answer")
    [ -n "$result_type" ] || fail "$function answered without a ce-type"
    [ "$(probe http://127.0.0.1:8080/metrics)" = 200 ] || fail "$function: /metrics did not answer 200"
    "${PODMAN[@]}" stop -t 30 onnxfn-check >/dev/null
    code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' onnxfn-check)
    logs=$("${PODMAN[@]}" logs onnxfn-check 2>&1)
    [ "$code" = 0 ] || { echo "$logs" | tail -20 >&2; fail "$function exited with code $code at SIGTERM"; }
    if grep -E 'Traceback|SIGABRT|terminate called|Segmentation' <<<"$logs" >&2; then
        fail "$function's log shows a crash"
    fi
    errors=$(grep -c ' ERROR ' <<<"$logs" || true)
    say "$function: ready in ${COLD_S[$function]} s as uid $user, answered $result_type, /metrics 200, SIGTERM exit 0 ($errors ERROR line(s) in its log)"
    "${PODMAN[@]}" rm onnxfn-check >/dev/null
done

# -- 4. report ---------------------------------------------------------------------------------
echo
echo "image        size       build"
for target in $TARGETS; do
    size=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "onnxfn:$target")
    printf 'onnxfn:%-5s %6d MB  %4s s\n' "$target" "$((size / 1000000))" "${BUILD_S[$target]}"
done
echo
echo "cold start (container start to readiness 200), onnxfn:cpu"
for function in $FUNCTIONS; do printf '  %-12s %s s\n' "$function" "${COLD_S[$function]}"; done
echo "image-check: OK"
