#!/usr/bin/env bash
# Build the advguard image with podman on a local Debian 12 base and run it for real: readiness,
# one real CIFAR-10 image through POST /classify (the verdict must equal `advguard classify` run
# on this host), the metrics endpoint, and a SIGTERM drain. docs/deploy.md, "Verifying the image".
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${ADVGUARD_IMAGE_CACHE:-/var/tmp/advguard-image}
BASE=""                                   # empty: the local Debian 12 base below
LOCAL_BASE=localhost/advguard-base:debian12
MIRROR=http://deb.debian.org/debian
TAG=localhost/advguard:0.1.0
INPUT=$REPO/../shared/data/cifar10-jpeg.tar.gz
MEMBER=test/cat/0000.jpg
VENV=$REPO/.venv
API_PORT=8000                             # the api's port inside the container
METRICS_PORT=${ADVGUARD_VERIFY_METRICS_PORT:-9000}   # ADVGUARD_ADMIN_PORT's default
METRICS_PATH=/metrics
TOLERANCE=1e-4
READY_TIMEOUT=300
STOP_TIMEOUT=45                           # compose's stop_grace_period
SKIP_BUILD=0
CA_BUNDLE=${PIP_CERT:-}                   # a TLS-intercepting proxy's CA for pip during the build
RUNTIME=${ADVGUARD_VERIFY_RUNTIME:-}      # empty: runc on hybrid cgroups, else podman's default

usage() {
  cat <<EOF
Usage: deploy/verify-image.sh [options] [IMAGE.jpg | CIFAR10.tar.gz]

Builds the advguard image with podman on a local Debian 12 base (made with debootstrap and
podman import when missing), runs it on the CPU with the demo bundle, and checks:
  - GET /readyz answers 200 within --ready-timeout seconds, and the image's HEALTHCHECK passes;
  - POST /classify of a real image gives the verdict of \`advguard classify\` on this host
    (decision, class, probability and score within --tolerance);
  - the metrics endpoint counts that request;
  - podman stop (SIGTERM, --stop-timeout) drains: exit code 0 and uvicorn's
    "Application shutdown complete." in the log.
Then prints the runtime and the image size. Exit 0 only when every check passes.

The image argument is a JPEG file, or a .tar.gz of the CIFAR-10 JPEG layout from which
--member is taken (default: $INPUT, member $MEMBER).

Options:
  --base IMAGE          build on IMAGE instead of the local Debian base (e.g. the CUDA image)
  --tag TAG             image tag to build and run (default $TAG)
  --cache DIR           base rootfs tarball and podman config (default $CACHE,
                        or ADVGUARD_IMAGE_CACHE)
  --mirror URL          Debian mirror for debootstrap (default $MIRROR)
  --member PATH         archive member to classify (default $MEMBER)
  --venv DIR            host virtualenv with advguard installed (default $VENV)
  --metrics-port PORT   container port serving the metrics (default $METRICS_PORT, the admin
                        port; 8000 before /metrics moved there; or ADVGUARD_VERIFY_METRICS_PORT)
  --metrics-path PATH   (default $METRICS_PATH)
  --tolerance X         probability/score tolerance (default $TOLERANCE)
  --ready-timeout S     (default $READY_TIMEOUT)
  --stop-timeout S      podman stop's grace period (default $STOP_TIMEOUT)
  --runtime NAME        OCI runtime (default: runc where cgroups are mounted in hybrid mode,
                        which crun refuses; else podman's default)
  --ca-bundle FILE      CA bundle pip trusts during the build, mounted, never copied into the
                        image (default: \$PIP_CERT, else the host pip's cert setting; for a
                        TLS-intercepting proxy)
  --skip-build          run the existing --tag image
  -h, --help            this text
EOF
}

die() { echo "verify-image: error: $*" >&2; exit 1; }
say() { echo "verify-image: $*"; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }

while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --base) need_value "$@"; BASE=$2; shift 2 ;;
    --tag) need_value "$@"; TAG=$2; shift 2 ;;
    --cache) need_value "$@"; CACHE=$2; shift 2 ;;
    --mirror) need_value "$@"; MIRROR=$2; shift 2 ;;
    --member) need_value "$@"; MEMBER=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --metrics-port) need_value "$@"; METRICS_PORT=$2; shift 2 ;;
    --metrics-path) need_value "$@"; METRICS_PATH=$2; shift 2 ;;
    --tolerance) need_value "$@"; TOLERANCE=$2; shift 2 ;;
    --ready-timeout) need_value "$@"; READY_TIMEOUT=$2; shift 2 ;;
    --stop-timeout) need_value "$@"; STOP_TIMEOUT=$2; shift 2 ;;
    --runtime) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --ca-bundle) need_value "$@"; CA_BUNDLE=$2; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) INPUT=$1; shift ;;
  esac
done

for number in "$METRICS_PORT" "$READY_TIMEOUT" "$STOP_TIMEOUT"; do
  [[ $number =~ ^[0-9]+$ ]] || die "not a whole number: $number"
done
[ -e "$INPUT" ] || die "no such image or archive: $INPUT"
[ -x "$VENV/bin/advguard" ] || die "$VENV/bin/advguard missing: install the project first (README, Set up)"
for tool in podman curl; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

if [ -z "$CA_BUNDLE" ]; then  # else the host pip's own `cert` setting (pip.conf), if any
  CA_BUNDLE=$("$VENV/bin/python" -m pip config list 2>/dev/null \
    | sed -n "/^global\.cert='/{s/^global\.cert='\(.*\)'\$/\1/p;q;}")
fi

started=$(date +%s)
mkdir -p "$CACHE"
work=$(mktemp -d /tmp/advguard-verify.XXXXXX)
container=advguard-verify-$$
cleanup() {
  podman rm -f -t 0 "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Podman's default per-container rlimits cannot be set in some sandboxes; an empty default list
# (and --ulimit host below) keeps the host's. An explicit CONTAINERS_CONF is respected.
if [ -z "${CONTAINERS_CONF:-}" ]; then
  printf '[containers]\ndefault_ulimits = []\n' > "$CACHE/containers.conf"
  export CONTAINERS_CONF=$CACHE/containers.conf
fi

# crun refuses cgroups v1 with a v2 hierarchy beside it ("hybrid mode"); runc runs there.
if [ -z "$RUNTIME" ] && [ -d /sys/fs/cgroup/unified ] && command -v runc >/dev/null; then
  RUNTIME=runc
fi
podman() { command podman ${RUNTIME:+--runtime "$RUNTIME"} "$@"; }

elapsed() { echo $(( $(date +%s) - $1 )); }

# --- (a) the base -----------------------------------------------------------------------------
base_s=0
if [ -z "$BASE" ]; then
  BASE=$LOCAL_BASE
  if podman image exists "$BASE"; then
    say "base $BASE present (podman image store; rootfs tarball cached in $CACHE)"
  else
    t=$(date +%s)
    rootfs_tar=$CACHE/debian12-rootfs.tar
    if [ ! -s "$rootfs_tar" ]; then
      command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
      [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
      say "making the Debian 12 base with debootstrap from $MIRROR (a few minutes)"
      rm -rf "$CACHE/rootfs"
      debootstrap --variant=minbase --include=passwd bookworm "$CACHE/rootfs" "$MIRROR" \
        > "$CACHE/debootstrap.log" 2>&1 || die "debootstrap failed: see $CACHE/debootstrap.log"
      tar -C "$CACHE/rootfs" --numeric-owner -cf "$rootfs_tar.part" .
      mv "$rootfs_tar.part" "$rootfs_tar"
      rm -rf "$CACHE/rootfs"
    fi
    # an imported rootfs has no environment: give it Debian's PATH (the Dockerfile extends it)
    podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' "$rootfs_tar" "$BASE" >/dev/null
    base_s=$(elapsed "$t")
    say "base $BASE imported from $rootfs_tar in ${base_s}s"
  fi
fi

# --- (b) the image ----------------------------------------------------------------------------
build_s=0
if [ "$SKIP_BUILD" -eq 0 ]; then
  t=$(date +%s)
  say "building $TAG on $BASE (first time: torch's CUDA wheels, several GB)"
  # build-time mounts only (RUN steps see them; the image does not keep them)
  mounts=()
  if [ -n "$CA_BUNDLE" ]; then
    [ -r "$CA_BUNDLE" ] || die "cannot read the CA bundle $CA_BUNDLE"
    printf '[global]\ncert = /run/advguard-build/ca.crt\n' > "$work/pip.conf"
    mounts+=(-v "$(realpath "$CA_BUNDLE"):/run/advguard-build/ca.crt:ro" -v "$work/pip.conf:/etc/pip.conf:ro")
    say "pip trusts $CA_BUNDLE during the build"
  fi
  # docker format keeps the HEALTHCHECK; host network reaches the mirror and the package index
  podman build --format docker --network host "${mounts[@]}" \
    --build-arg "CUDA_IMAGE=$BASE" -t "$TAG" -f "$REPO/Dockerfile" "$REPO" \
    || die "podman build failed"
  build_s=$(elapsed "$t")
  say "built $TAG in ${build_s}s"
else
  podman image exists "$TAG" || die "--skip-build: no image $TAG"
fi

# --- (c) run it -------------------------------------------------------------------------------
case $INPUT in
  *.tar.gz|*.tgz|*.tar)
    image=$work/$(basename "$MEMBER")
    tar -xzf "$INPUT" -O "$MEMBER" > "$image" 2>/dev/null || die "no member $MEMBER in $INPUT"
    ;;
  *) image=$INPUT ;;
esac
say "image to classify: $INPUT${image:+ -> $(basename "$image")}"

"$VENV/bin/advguard" classify --device cpu "$image" > "$work/host.json" \
  || die "advguard classify failed on the host"

publish=(-p "127.0.0.1::$API_PORT")
[ "$METRICS_PORT" = "$API_PORT" ] || publish+=(-p "127.0.0.1::$METRICS_PORT")
t=$(date +%s)
# the HEALTHCHECK is run once by hand below (no systemd timers here: interval disabled)
podman run -d --name "$container" --ulimit host --health-interval disable "${publish[@]}" \
  -e ADVGUARD_DEVICE=cpu -e ADVGUARD_EXPOSE_SCORES=true "$TAG" >/dev/null \
  || die "podman run failed"
host_port() { podman port "$container" "$1/tcp" | head -n1 | sed 's/.*://'; }
api=http://127.0.0.1:$(host_port "$API_PORT")
metrics_url=http://127.0.0.1:$(host_port "$METRICS_PORT")$METRICS_PATH
say "container $container: api $api, metrics $metrics_url"

failures=0
fail() { echo "verify-image: FAIL: $*" >&2; failures=$((failures + 1)); }
pass() { echo "verify-image: ok: $*"; }

ready=0
for _ in $(seq "$READY_TIMEOUT"); do
  if [ "$(podman inspect -f '{{.State.Running}}' "$container")" != true ]; then
    podman logs "$container" >&2 || true
    die "the container exited before it was ready"
  fi
  if curl -sf -o /dev/null "$api/readyz"; then ready=1; break; fi
  sleep 1
done
[ "$ready" -eq 1 ] || { podman logs "$container" >&2; die "not ready within ${READY_TIMEOUT}s"; }
ready_s=$(elapsed "$t")
pass "ready in ${ready_s}s"

if podman healthcheck run "$container" >/dev/null; then
  pass "the image's HEALTHCHECK (deploy/docker/healthcheck.py) reports healthy"
else
  fail "the image's HEALTHCHECK reports unhealthy"
fi

if curl -sf -F "file=@$image" "$api/classify" > "$work/api.json"; then
  if "$VENV/bin/python" - "$work/host.json" "$work/api.json" "$TOLERANCE" <<'EOF'
import json, sys

host = json.loads(open(sys.argv[1]).read().splitlines()[0])
api = json.load(open(sys.argv[2]))
tol = float(sys.argv[3])
decision = "accepted" if host["accepted"] else "rejected"
problems = []
if api["decision"] != decision:
    problems.append(f"decision {api['decision']} != host {decision}")
for key in ("score", "threshold"):
    if api.get(key) is None or abs(api[key] - host[key]) > tol:
        problems.append(f"{key} {api.get(key)} != host {host[key]}")
if host["accepted"]:
    prediction = api.get("prediction") or {}
    if prediction.get("class_index") != host["predicted_class"]:
        problems.append(f"class {prediction.get('class_index')} != host {host['predicted_class']}")
    if abs(prediction.get("probability", float("nan")) - host["probability"]) > tol:
        problems.append(f"probability {prediction.get('probability')} != host {host['probability']}")
print(f"  host: {decision} {host['class_name']} p={host['probability']:.6f} score={host['score']:.6f}")
print(f"  api:  {json.dumps(api)}")
for problem in problems:
    print(f"  {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
  then pass "POST /classify equals advguard classify on the host (tolerance $TOLERANCE)"
  else fail "POST /classify differs from advguard classify on the host"
  fi
else
  fail "POST /classify did not answer 200"
fi

if curl -sf "$metrics_url" > "$work/metrics.txt" \
  && grep -Eq '^advguard_requests_total\{decision="(accepted|rejected)"\} [1-9]' "$work/metrics.txt"; then
  pass "metrics at $metrics_url count the request"
else
  fail "no advguard_requests_total sample >= 1 at $metrics_url (--metrics-port?)"
fi

t=$(date +%s)
podman stop -t "$STOP_TIMEOUT" "$container" >/dev/null
stop_s=$(elapsed "$t")
code=$(podman inspect -f '{{.State.ExitCode}}' "$container")
podman logs "$container" > "$work/container.log" 2>&1 || true  # (a file: grep -q + pipefail race)
if [ "$code" = 0 ] && grep -q 'Application shutdown complete' "$work/container.log"; then
  pass "SIGTERM drained in ${stop_s}s (exit code 0, application shutdown complete)"
else
  tail -n 20 "$work/container.log" >&2
  fail "SIGTERM: exit code $code after ${stop_s}s, or no 'Application shutdown complete' in the log"
fi

# --- (d) summary ------------------------------------------------------------------------------
size=$(podman image inspect -f '{{.Size}}' "$TAG")
say "image $TAG: $size bytes ($(numfmt --to=iec-i --suffix=B "$size")) on base $BASE"
say "runtime $(elapsed "$started")s (base ${base_s}s, build ${build_s}s, ready ${ready_s}s)"
if [ "$failures" -ne 0 ]; then
  say "$failures check(s) FAILED"
  exit 1
fi
say "all checks passed"
