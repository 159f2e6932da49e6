#!/usr/bin/env bash
# Build the kvdepot server image (deploy/docker/Dockerfile) with podman and run it the ways the
# deployment files run it (issue 14). By hand, as root, from anywhere in the repository:
#
#   sudo bash scripts/container_smoke.sh
#
# Checks (each prints "ok: <name>: ..." when it passed):
# - image: built with --format docker (else podman drops the HEALTHCHECK), user 10001, its
#   HEALTHCHECK passes against the running server;
# - docker-run: `--network host --ipc host` as docs/deploy.md runs it: /healthz and /readyz
#   answer, the segment is in the host's /dev/shm, mode 0600, owned by uid 10001;
# - host-client: an engine-side client on the host stores three chunks through the containerised
#   server (reserve, write into the arena, commit), then hits them and reads the bytes back;
# - second-container: a client in another container of the image (--ipc host) hits them too;
#   one without the host's IPC namespace is refused with ARENA_MISMATCH;
# - sigterm: `podman stop` exits 0 long before its kill timeout and the segment is gone;
# - kube-play: a Pod rendered from deploy/k8s/kvdepot-daemonset.yaml's template (hostNetwork,
#   the /dev/shm hostPath, the probes, the manifest's flags) runs under `podman kube play`,
#   answers both probes where the kubelet sends them and stops with status 0;
# - compose: deploy/docker/docker-compose.yaml's server runs under podman-compose with
#   --podman-run-args='--ipc host' (podman-compose ignores `ipc: host`: its issue #218).
# The last line, "summary: ...", gives the image's size and the times.
#
# Needs root (rootless podman maps the image's uid 10001 to a subordinate uid on the host) and a
# Python with kvdepot and PyYAML. Installs with apt what is missing (podman, runc, netavark,
# aardvark-dns, catatonit, mmdebstrap) and podman-compose into a throwaway venv. Needs no
# registry: the base image is bootstrapped from this machine's Debian sources with mmdebstrap
# (0.5-4 minutes) and kept as localhost/kvdepot-base:<suite>-<recipe digest> for later runs.
# Environment:
#   PYTHON                      the host's Python with kvdepot (default .venv/bin/python)
#   KVDEPOT_BASE_IMAGE          build on this image instead (python:3.12-slim where a registry is)
#   KVDEPOT_SMOKE_BUFFER_GB     the servers' --cpu-buffer-size (default 0.05)
#   KVDEPOT_SMOKE_KEEP_IMAGE=1  keep the image built (localhost/kvdepot-smoke:<run id>)
# Exit status: 0 every check passed; 77 skipped (not root, or no podman and no apt to install
# it), with the reason on stderr; anything else failed, with podman's last output on stderr.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
SKIPPED=77
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
BUFFER_GB=${KVDEPOT_SMOKE_BUFFER_GB:-0.05}
LOG=

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(now)
say() { echo "[container-smoke $(since "$T_START") s] $*"; }
ok() { echo "ok: $*"; }
skip() { echo "container-smoke: SKIPPED: $*" >&2; exit "$SKIPPED"; }
fail() {
    echo "container-smoke: FAILED: $*" >&2
    [ -s "$LOG" ] && { echo "--- the last of $LOG ---" >&2; tail -n 40 "$LOG" >&2; }
    exit 1
}
quiet() { "$@" >>"$LOG" 2>&1; }  # podman's own output goes to the log
helper() { "$PYTHON" "$WORK/smoke.py" "$@"; }
owner_and_mode_ok() { [ "$(stat -c '%a %u' "/dev/shm/$1" 2>&1)" = "600 10001" ]; }
server_args() {  # PORT HTTP_PORT SHM_NAME: the flags of one smoke server
    echo --host 127.0.0.1 --port "$1" --http-port "$2" --cpu-buffer-size "$BUFFER_GB" \
        --chunk-size 256 --shm-name "$3"
}

install_engine() {
    local packages=()
    command -v podman >/dev/null || packages+=(podman netavark aardvark-dns catatonit)
    command -v runc >/dev/null || packages+=(runc)
    [ -n "${KVDEPOT_BASE_IMAGE:-}" ] || command -v mmdebstrap >/dev/null || packages+=(mmdebstrap)
    [ ${#packages[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || skip "no podman here, and no apt-get to install it"
    say "installing ${packages[*]}"
    # apt's temporary files need a TMPDIR it may write (/tmp is not one on some CI machines).
    { TMPDIR=/var/tmp apt-get update -qq &&
      TMPDIR=/var/tmp DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq --no-install-recommends "${packages[@]}"; } >/dev/null 2>&1 ||
        skip "apt-get could not install ${packages[*]}"
}

configure_engine() {  # a containers.conf of this run's own
    # podman lowers its own RLIMIT_NPROC to 32768 when it starts, and without CAP_SYS_RESOURCE
    # (CI sandboxes) runc cannot give a container more than podman has: podman's default
    # container ulimits then fail with "error setting rlimit type 6".
    local nofile nproc
    nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] && nofile=1048576
    { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
    # runc: crun fails on hybrid cgroup hierarchies (this project's CI machine). netavark:
    # every container here shares the host's network, and podman 4.3 would otherwise warn on
    # every command about the CNI configuration Debian installs.
    cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
[network]
network_backend = "netavark"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf
    export TMPDIR=/var/tmp  # mmdebstrap's and podman's temporary files
    quiet podman info || skip "podman does not run here: $(tail -n 1 "$LOG")"
}

base_image() {  # sets BASE_IMAGE: KVDEPOT_BASE_IMAGE, or one bootstrapped from Debian packages
    BASE_IMAGE=${KVDEPOT_BASE_IMAGE:-}
    [ -n "$BASE_IMAGE" ] && return
    local suite recipe sources=() f t
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ -n "$suite" ] || skip "no Debian release name in /etc/os-release to bootstrap a base from"
    # What the Dockerfile asks of a base (its header says what), without docs, man pages and
    # locales; pip may install system-wide (no EXTERNALLY-MANAGED marker).
    recipe=(--variant=minbase --aptopt='APT::Install-Recommends "false"'
        --dpkgopt='path-exclude=/usr/share/doc/*'
        --dpkgopt='path-include=/usr/share/doc/*/copyright'
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
        --dpkgopt='path-exclude=/usr/share/locale/*'
        --include=python3,python3-pip,python-is-python3,passwd,ca-certificates
        --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED')
    BASE_IMAGE=localhost/kvdepot-base:$suite-$(echo "$suite ${recipe[*]}" | sha256sum | cut -c1-12)
    if podman image exists "$BASE_IMAGE"; then
        say "base image $BASE_IMAGE is cached"
        return
    fi
    # This machine's own Debian sources (its mirror, its snapshot), else mmdebstrap's default.
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$f" ] && grep -Eq '^(deb |Types:)' "$f"; then sources=("$f"); break; fi
    done
    say "bootstrapping $BASE_IMAGE from Debian $suite (${sources[*]:-deb.debian.org})"
    t=$(now)
    mmdebstrap --quiet "${recipe[@]}" "$suite" - "${sources[@]}" 2>>"$LOG" |
        quiet podman import --quiet - "$BASE_IMAGE" || fail "bootstrapping the base image"
    say "base image bootstrapped in $(since "$t") s"
}

build_image() {  # sets IMAGE_MB, IMAGE_USER, BUILD_S
    # pip in the build reaches the package index the way this host's pip does: the host's
    # network, its CA bundle (mounted over the base's own, so nothing is left in the image), its
    # index if that is not PyPI.
    local index ca t build
    read -r index ca < <(helper pip-settings)  # "-" for none
    build=(podman build --format docker --network host --layers=false
        -f deploy/docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE")
    [ "$ca" = - ] || build+=(--volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro"
        --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
    [ "$index" = - ] || build+=(--build-arg "PIP_INDEX_URL=$index")
    say "building $IMAGE on $BASE_IMAGE"
    t=$(now)
    quiet "${build[@]}" . || fail "podman build"
    BUILD_S=$(since "$t")
    IMAGE_MB=$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f", $1/1e6 }')
    IMAGE_USER=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
    [ "${IMAGE_USER%%:*}" = 10001 ] || fail "the image runs as '$IMAGE_USER', not uid 10001"
    podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" |
        grep -q KVDEPOT_HEALTH_URL || fail "the image has no HEALTHCHECK"
    say "built in $BUILD_S s: $IMAGE_MB MB, user $IMAGE_USER"
}

time_bare_server() {  # sets BARE_READY_S: the same server's start without a container
    local port http_port t
    read -r port http_port < <(helper ports 2)
    t=$(now)
    # shellcheck disable=SC2046
    "$PYTHON" -m kvdepot.server $(server_args "$port" "$http_port" "$SHM_PREFIX-bare") \
        >>"$LOG" 2>&1 &
    BARE_PID=$!
    BARE_READY_S=$(helper wait-ready "http://127.0.0.1:$http_port" "$t" 60) ||
        fail "the server without a container never got ready"
    kill -TERM "$BARE_PID" && wait "$BARE_PID" || fail "the server without a container: SIGTERM"
    BARE_PID=
}

check_docker_run() {  # sets READY_S, STOP_S
    local port http_port shm=$SHM_PREFIX-run t digest client status
    read -r port http_port < <(helper ports 2)
    t=$(now)
    # shellcheck disable=SC2046
    quiet podman run -d --name "$SERVER" --network host --ipc host \
        -e "KVDEPOT_HEALTH_URL=http://127.0.0.1:$http_port/healthz" \
        "$IMAGE" $(server_args "$port" "$http_port" "$shm") || fail "podman run"
    READY_S=$(helper wait-ready "http://127.0.0.1:$http_port" "$t" 60) ||
        { quiet podman logs "$SERVER"; fail "the container never answered /readyz"; }
    helper expect-http "http://127.0.0.1:$http_port/healthz" 200 ok || fail "/healthz"
    helper expect-http "http://127.0.0.1:$http_port/readyz" 200 ready || fail "/readyz"
    owner_and_mode_ok "$shm" ||
        fail "/dev/shm/$shm: $(stat -c '%a %u' "/dev/shm/$shm" 2>&1), want mode 600 and uid 10001"
    ok "docker-run: /healthz and /readyz answer, /dev/shm/$shm is on the host with mode 0600" \
        "and uid 10001 (ready $READY_S s after podman run)"
    quiet podman healthcheck run "$SERVER" || fail "the image's HEALTHCHECK fails on a live server"
    ok "image: built with --format docker, user $IMAGE_USER, its HEALTHCHECK passes"

    digest=$(helper host-client "$port" "$shm") || fail "the host's client"
    ok "host-client: stored 3 chunks through the container, hit them, read the same bytes back"
    client=(podman run --rm --network host -v "$WORK/smoke.py:/smoke.py:ro" --entrypoint python)
    quiet "${client[@]}" --ipc host "$IMAGE" /smoke.py container-client "$port" "$digest" ||
        fail "the client in a second container (--ipc host)"
    quiet "${client[@]}" "$IMAGE" /smoke.py container-client "$port" --expect-mismatch ||
        fail "a container without the host's IPC namespace was not refused with ARENA_MISMATCH"
    ok "second-container: a client in a second container hit the same chunks; one without" \
        "--ipc host got ARENA_MISMATCH"

    t=$(now)
    quiet podman stop -t 30 "$SERVER" || fail "podman stop"
    STOP_S=$(since "$t")
    status=$(podman inspect --format '{{.State.ExitCode}}' "$SERVER")
    [ "$status" = 0 ] || fail "the server exited with status $status on SIGTERM"
    [ ! -e "/dev/shm/$shm" ] || fail "/dev/shm/$shm is still there after the server stopped"
    podman logs "$SERVER" 2>&1 | grep -q "kvdepot stopped; removed /dev/shm/$shm" ||
        fail "no 'kvdepot stopped' line in the container's log"
    quiet podman rm "$SERVER"
    ok "sigterm: podman stop took $STOP_S s, exit status 0, the segment removed"
}

check_kube_play() {
    local port http_port shm=$SHM_PREFIX-kube node_ip probes status
    read -r port http_port < <(helper ports 2)
    node_ip=$(helper node-ip)
    probes=$(helper render-pod deploy/k8s/kvdepot-daemonset.yaml "$POD_YAML" "$IMAGE" \
        "$IMAGE_USER" "$port" "$http_port" "$shm" "$BUFFER_GB" "$node_ip" "$POD") ||
        fail "rendering a Pod from the DaemonSet"
    quiet podman kube play "$POD_YAML" || fail "podman kube play"
    # The kubelet sends HTTP probes to the pod's IP: the node's, with hostNetwork.
    # shellcheck disable=SC2086
    helper probe "$node_ip" 60 $probes || { quiet podman pod logs "$POD"; fail "the Pod's probes"; }
    owner_and_mode_ok "$shm" || fail "the Pod's segment in the host's /dev/shm"
    quiet podman pod stop -t 30 "$POD" || fail "podman pod stop"
    status=$(podman inspect --format '{{.State.ExitCode}}' "$POD-kvdepot")
    [ "$status" = 0 ] || fail "the Pod's server exited with status $status"
    [ ! -e "/dev/shm/$shm" ] || fail "the Pod's server left /dev/shm/$shm"
    quiet podman kube down "$POD_YAML" || fail "podman kube down"
    rm -f "$POD_YAML"
    ok "kube-play: the DaemonSet's Pod answered its probes on $node_ip ($probes), its segment" \
        "in the host's /dev/shm, stopped with status 0"
}

check_compose() {
    local port http_port shm=$SHM_PREFIX-compose
    # Debian 12's podman-compose 1.0.3 cannot run this file: it adds a project network beside
    # network_mode: host (podman refuses both) and appends an override's command to the file's.
    say "installing podman-compose into a throwaway venv"
    { "$PYTHON" -m venv "$WORK/compose-venv" &&
      "$WORK/compose-venv/bin/python" -m pip install podman-compose==1.6.0; } >>"$LOG" 2>&1 ||
        fail "pip install podman-compose"
    read -r port http_port < <(helper ports 2)
    # shellcheck disable=SC2046
    helper compose-override "$WORK/compose-override.yaml" "$IMAGE" "$http_port" \
        $(server_args "$port" "$http_port" "$shm")
    COMPOSE=("$WORK/compose-venv/bin/podman-compose" --podman-run-args='--ipc host'
        -p "$PROJECT" -f deploy/docker/docker-compose.yaml -f "$WORK/compose-override.yaml")
    quiet "${COMPOSE[@]}" up -d kvdepot || fail "podman-compose up"
    helper wait-ready "http://127.0.0.1:$http_port" "$(now)" 60 >/dev/null ||
        fail "the compose service never got ready"
    owner_and_mode_ok "$shm" || fail "the compose service's segment is not in the host's /dev/shm"
    quiet podman healthcheck run "${PROJECT}_kvdepot_1" || fail "the compose service is not healthy"
    quiet "${COMPOSE[@]}" down -t 30 || fail "podman-compose down"
    COMPOSE=()
    [ ! -e "/dev/shm/$shm" ] || fail "podman-compose down left /dev/shm/$shm"
    ok "compose: the kvdepot service under podman-compose 1.6.0 --podman-run-args='--ipc host'" \
        "got ready and healthy, its segment in the host's /dev/shm, removed on down"
}

cleanup() {
    set +e
    [ -n "$BARE_PID" ] && kill "$BARE_PID" 2>/dev/null
    quiet podman rm -f -t 2 "$SERVER"
    [ -f "$POD_YAML" ] && quiet podman kube down "$POD_YAML"
    [ ${#COMPOSE[@]} -gt 0 ] && quiet "${COMPOSE[@]}" down -t 2
    [ "${KVDEPOT_SMOKE_KEEP_IMAGE:-0}" = 1 ] || quiet podman rmi -f "$IMAGE"
    rm -f /dev/shm/"$SHM_PREFIX"-*  # left only by a server of this run that was killed
    rm -rf "$WORK"
}

main() {
    [ "$(uname -s)" = Linux ] || skip "containers sharing the host's /dev/shm need Linux"
    [ "$(id -u)" = 0 ] || skip "needs root: rootless podman maps the image's uid 10001 to a" \
        "subordinate uid, so the segment's owner could not be checked (sudo bash $0)"
    "$PYTHON" -c "import kvdepot.client, yaml" 2>/dev/null ||
        fail "$PYTHON lacks kvdepot or PyYAML: pip install -e '.[test]', or set PYTHON"
    install_engine

    RUN_ID=$$-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
    WORK=$(mktemp -d /var/tmp/kvdepot-smoke.XXXXXX)
    chmod 755 "$WORK"  # the second container's user (10001) reads the helper from here
    LOG=$WORK/podman.log
    write_helper "$WORK/smoke.py"
    chmod 644 "$WORK/smoke.py"
    IMAGE=localhost/kvdepot-smoke:$RUN_ID
    SHM_PREFIX=kvdepot-smoke-$RUN_ID  # the segments of this run's servers
    SERVER=kvdepot-smoke-$RUN_ID POD=kvdepot-smoke-$RUN_ID PROJECT=kvdepot-smoke-$RUN_ID
    POD_YAML=$WORK/pod.yaml COMPOSE=() BARE_PID=
    trap cleanup EXIT

    configure_engine
    base_image
    build_image
    time_bare_server
    check_docker_run
    check_kube_play
    check_compose
    echo "summary: image $IMAGE_MB MB on $BASE_IMAGE, built in $BUILD_S s; start to /readyz" \
        "$READY_S s in a container, $BARE_READY_S s without (buffer $BUFFER_GB GB);" \
        "podman stop $STOP_S s; total $(since "$T_START") s"
}

write_helper() {  # FILE: the Python helpers below
    cat >"$1" <<'PY'
"""Helpers of scripts/container_smoke.sh; the host's Python runs them, and the image's Python
runs container-client. Each command exits non-zero with the reason on stderr."""

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

MODEL = "container-smoke"
TOKENS = [random.Random(14).randrange(50_000) for _ in range(3 * 256)]  # three 256-token chunks


def die(message):
    sys.exit(f"container-smoke: {message}")


def ports(count):
    """Free TCP ports on 127.0.0.1, distinct."""
    sockets = [socket.socket() for _ in range(int(count))]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    print(" ".join(str(s.getsockname()[1]) for s in sockets))
    for s in sockets:
        s.close()


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()
    except OSError as e:
        return None, str(e)


def wait_ready(base_url, t0, timeout):
    """Poll /readyz until 200; print the seconds since t0 (epoch seconds)."""
    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        if http_get(base_url + "/readyz")[0] == 200:
            print(f"{time.time() - float(t0):.2f}")
            return
        time.sleep(0.05)
    die(f"{base_url}/readyz not 200 within {timeout} s: {http_get(base_url + '/readyz')}")


def expect_http(url, status, body):
    got = http_get(url)
    if got != (int(status), body):
        die(f"GET {url}: {got}, want {(int(status), body)}")


def pip_settings():
    """The host pip's index (if not PyPI's) and CA bundle, as `INDEX CA` ("-" for none)."""
    def config(key):
        run = subprocess.run([sys.executable, "-m", "pip", "config", "get", key],
                             capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""

    index = (os.environ.get("PIP_INDEX_URL") or config("global.index-url")
             or config("install.index-url"))
    if not index.startswith(("http://", "https://")):
        index = ""  # a local directory is not in the build container
    ca = next((c for c in (os.environ.get("PIP_CERT"), config("global.cert"),
                           os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("SSL_CERT_FILE"),
                           "/etc/ssl/certs/ca-certificates.crt") if c and os.path.isfile(c)), "")
    print(index or "-", ca or "-")


def geometry():
    from kvdepot.protocol import KVGeometry

    piece = 16 * 2 * 2 * 16 * 2  # block 16 tokens, 2 KV heads, K and V of 16 dims, bf16
    return KVGeometry(num_layers=2, num_kv_heads=2, head_size_k=16, head_size_v=16,
                      dtype="bfloat16", block_size=16, num_planes=2, piece_bytes=piece,
                      layout="layer_major:2x2048:container-smoke")


def host_client(port, shm_name):
    """Store three chunks through the server, hit them, read them back; print their sha256."""
    import numpy as np

    from kvdepot.client import KVDepotClient
    from kvdepot.protocol import SlotStatus

    with KVDepotClient("127.0.0.1", int(port), timeout_ms=5000) as client:
        if not client.connect():
            die(f"the host's client cannot reach the server on port {port}")
        if client.arena().name != shm_name:
            die(f"the server announced segment {client.arena().name}, not {shm_name}")
        ns = client.register(MODEL, geometry())
        keys = client.chunk_keys(ns, TOKENS)
        if client.lookup(ns, keys).hit_chunks != 0:
            die("a fresh server already holds the chunks")
        reservation = client.reserve(ns, 0, keys)
        if reservation.status != [SlotStatus.RESERVED] * len(keys):
            die(f"reserve: {reservation.status}")
        arena = client.arena_array()
        written = b""
        for i, offset in enumerate(reservation.offsets):
            data = np.random.default_rng(i).integers(0, 256, ns.slot_bytes, dtype=np.uint8)
            arena[offset : offset + ns.slot_bytes] = data
            written += data.tobytes()
        if client.commit(reservation.id) != len(keys):
            die("commit did not store every chunk")
        print(hashlib.sha256(written).hexdigest())
        read_back(client, ns, keys, hashlib.sha256(written).hexdigest())


def read_back(client, ns, keys, digest):
    hit = client.lookup(ns, keys, lease_ms=10_000)
    if hit.hit_chunks != len(keys):
        die(f"lookup hit {hit.hit_chunks} of {len(keys)} chunks")
    arena = client.arena_array()
    got = b"".join(arena[o : o + ns.slot_bytes].tobytes() for o in hit.rank_offsets(0))
    client.release([hit.lease], retrieved=[hit.lease])
    if hashlib.sha256(got).hexdigest() != digest:
        die("the bytes read back differ from those stored")


def container_client(port, digest_or_flag):
    """In a container of the image: hit the host client's chunks, or (--expect-mismatch, no
    host IPC namespace) be refused because the server's segment is not visible."""
    from kvdepot.client import KVDepotClient
    from kvdepot.client.engine_client import ArenaMismatch

    with KVDepotClient("127.0.0.1", int(port), timeout_ms=5000) as client:
        if digest_or_flag == "--expect-mismatch":
            try:
                client.register(MODEL, geometry())
            except ArenaMismatch as exc:
                print(f"refused as expected: {exc}")
                return
            die("a container without the host's IPC namespace mapped the server's segment")
        ns = client.register(MODEL, geometry())
        read_back(client, ns, client.chunk_keys(ns, TOKENS), digest_or_flag)
        print("hit the host client's chunks")


def node_ip():
    """This machine's primary IPv4 address (what the kubelet reports as status.hostIP)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
            print(s.getsockname()[0])
    except OSError:
        print("127.0.0.1")


def set_flag(args, flag, value):
    if flag not in args:
        die(f"the DaemonSet's args have no {flag}")
    args[args.index(flag) + 1] = value


def render_pod(ds_path, out, image, image_user, port, http_port, shm, buffer_gb, host_ip, name):
    """A Pod from the DaemonSet's template, as the kubelet would run it on a node with IP
    host_ip, changed only where this machine needs it: the local image, free ports, its own
    segment name, a small buffer (memory request and limit kept at buffer + 1 GB). What podman
    4.3 lacks and the kubelet does is done here: status.hostIP, $(VAR) in args, and no
    containerPorts (podman maps them like hostPorts, which host networking refuses).
    Checks on the way that the manifest agrees with the image. Prints the probes as PATH:PORT."""
    import re

    import yaml

    docs = [d for d in yaml.safe_load_all(open(ds_path)) if d]
    template = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]
    args = [str(a) for a in container["args"]]
    named = {p["name"]: p["containerPort"] for p in container.pop("ports")}
    if (named.get("zmq"), named.get("http")) != (int(args[args.index("--port") + 1]),
                                                  int(args[args.index("--http-port") + 1])):
        die(f"the DaemonSet's containerPorts {named} are not its --port and --http-port")
    if spec["securityContext"]["runAsUser"] != int(image_user.split(":")[0]):
        die(f"runAsUser {spec['securityContext']['runAsUser']} is not the image's {image_user}")
    if spec.get("hostNetwork") is not True:
        die("the DaemonSet does not use the host's network")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if volumes[mounts["/dev/shm"]]["hostPath"]["path"] != "/dev/shm":
        die("the DaemonSet does not mount the host's /dev/shm")
    new_ports = {"zmq": int(port), "http": int(http_port)}
    probes = []
    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[kind]["httpGet"]
        if get["path"] != path:
            die(f"the {kind} asks {get['path']}, the server answers {path}")
        if named.get(get["port"], get["port"]) != named["http"]:
            die(f"the {kind}'s port {get['port']} is not the server's --http-port")
        get["port"] = new_ports["http"]
        probes.append(f"{path}:{get['port']}")

    container["image"] = image
    for flag, value in (("--port", port), ("--http-port", http_port), ("--shm-name", shm),
                        ("--cpu-buffer-size", buffer_gb)):
        set_flag(args, flag, str(value))
    memory = f"{round((float(buffer_gb) + 1) * 1000)}M"
    container["resources"]["requests"]["memory"] = memory
    container["resources"]["limits"]["memory"] = memory
    env = {}
    for var in container["env"]:
        if "valueFrom" in var:
            if var["valueFrom"].get("fieldRef", {}).get("fieldPath") != "status.hostIP":
                die(f"env {var['name']}: only status.hostIP is rendered here")
            del var["valueFrom"]
            var["value"] = host_ip
        env[var["name"]] = var["value"]
    expand = lambda m: env.get(m.group(1), m.group(0))  # noqa: E731 (the kubelet's $(VAR))
    container["args"] = [re.sub(r"\$\((\w+)\)", expand, a) for a in args]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": template["metadata"]["labels"],
                        "annotations": template["metadata"].get("annotations", {})},
           "spec": spec}
    with open(out, "w") as f:
        yaml.safe_dump(pod, f, sort_keys=False)
    print(" ".join(probes))


def probe(host, timeout, *probes):
    """GET each PATH:PORT on host until 200, as the kubelet's httpGet probes do."""
    deadline = time.time() + float(timeout)
    for target in probes:
        path, port = target.rsplit(":", 1)
        url = f"http://{host}:{port}{path}"
        while http_get(url)[0] != 200:
            if time.time() > deadline:
                die(f"probe {url}: {http_get(url)}")
            time.sleep(0.1)


def compose_override(out, image, http_port, *server_args):
    """An override for docker-compose.yaml's kvdepot service: this run's image, ports and
    segment name (the health check follows the HTTP port)."""
    service = {"image": image, "command": list(server_args),
               "environment": {"KVDEPOT_HEALTH_URL": f"http://127.0.0.1:{http_port}/healthz"}}
    with open(out, "w") as f:
        json.dump({"services": {"kvdepot": service}}, f)  # JSON is YAML


COMMANDS = {"ports": ports, "wait-ready": wait_ready, "expect-http": expect_http,
            "pip-settings": pip_settings, "host-client": host_client,
            "container-client": container_client, "node-ip": node_ip,
            "render-pod": render_pod, "probe": probe, "compose-override": compose_override}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
PY
}

main "$@"
