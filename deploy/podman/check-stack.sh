#!/usr/bin/env bash
# Bring the compose stack up with podman-compose (api on the CPU, Redis and Prometheus built
# locally from Debian packages; no Grafana) and check that Prometheus scrapes the api.
# Run deploy/verify-image.sh first: it makes the Debian base and the advguard image.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COMPOSE=${PODMAN_COMPOSE:-podman-compose}
PROJECT=advguard-podman-check
BASE=localhost/advguard-base:debian12
TAG=localhost/advguard:0.1.0
PROMETHEUS=http://127.0.0.1:9090
JOB=advguard-api
TIMEOUT=240
CACHE=${ADVGUARD_IMAGE_CACHE:-/var/tmp/advguard-image}
KEEP=0
INPUT=$REPO/../shared/data/cifar10-jpeg.tar.gz
MEMBER=test/cat/0000.jpg
API=http://127.0.0.1:8000

usage() {
  cat <<EOF
Usage: deploy/podman/check-stack.sh [options]

Starts docker-compose.yml + docker-compose.cpu.yml + deploy/podman/docker-compose.podman.yml
with podman-compose (project $PROJECT: api-cpu, redis, prometheus; ports 8000 and 9090 on the
host), waits until Prometheus reports up{job="$JOB"} == 1 and has loaded the alert rules and
scraped advguard_bundle_info, classifies one image through the api and checks that the client's
statistics landed in Redis, then takes the stack down (volumes too). Exit 0 only then.

Options:
  --compose CMD      podman-compose command (default $COMPOSE, or PODMAN_COMPOSE)
  --job NAME         Prometheus job of the api (default $JOB)
  --timeout S        seconds to wait for the scrape (default $TIMEOUT)
  --image PATH       a JPEG, or the CIFAR-10 .tar.gz ($MEMBER is taken; default
                     $INPUT)
  --keep             leave the stack running
  -h, --help         this text
EOF
}

die() { echo "check-stack: error: $*" >&2; exit 1; }
say() { echo "check-stack: $*"; }

while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --compose) [ $# -ge 2 ] || die "--compose needs a value"; COMPOSE=$2; shift 2 ;;
    --job) [ $# -ge 2 ] || die "--job needs a value"; JOB=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "--timeout needs a value"; TIMEOUT=$2; shift 2 ;;
    --image) [ $# -ge 2 ] || die "--image needs a value"; INPUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout: not a whole number: $TIMEOUT"
[ -e "$INPUT" ] || die "no such image or archive: $INPUT"
read -r -a compose_cmd <<< "$COMPOSE"
command -v "${compose_cmd[0]}" >/dev/null || die "${compose_cmd[0]} not found (pip install podman-compose)"
for tool in podman curl; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
for image in "$BASE" "$TAG"; do
  podman image exists "$image" || die "$image missing: run deploy/verify-image.sh first"
done

# As in verify-image.sh: no default rlimits (forbidden in some sandboxes), and runc where cgroups
# are mounted in hybrid mode (crun refuses them). podman-compose calls plain podman.
if [ -z "${CONTAINERS_CONF:-}" ]; then
  mkdir -p "$CACHE"
  {
    printf '[containers]\ndefault_ulimits = []\n'
    if [ -d /sys/fs/cgroup/unified ] && command -v runc >/dev/null; then
      printf '[engine]\nruntime = "runc"\n'
    fi
  } > "$CACHE/containers-stack.conf"
  export CONTAINERS_CONF=$CACHE/containers-stack.conf
fi

cd "$REPO"
compose() {
  "${compose_cmd[@]}" -p "$PROJECT" -f docker-compose.yml -f docker-compose.cpu.yml \
    -f deploy/podman/docker-compose.podman.yml "$@"
}
work=$(mktemp -d /tmp/advguard-stack.XXXXXX)
down() {
  [ "$KEEP" -eq 1 ] || compose down -v >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap down EXIT
case $INPUT in
  *.tar.gz|*.tgz|*.tar)
    image=$work/$(basename "$MEMBER")
    tar -xzf "$INPUT" -O "$MEMBER" > "$image" 2>/dev/null || die "no member $MEMBER in $INPUT"
    ;;
  *) image=$INPUT ;;
esac

started=$(date +%s)
say "building Redis and Prometheus from Debian packages on $BASE"
compose build redis prometheus
compose up -d
say "waiting up to ${TIMEOUT}s for Prometheus to scrape the api (job $JOB)"

query() {  # the first sample's value of an instant query, or nothing
  curl -sf -G "$PROMETHEUS/api/v1/query" --data-urlencode "query=$1" \
    | sed -n 's/.*"value":\[[^,]*,"\([^"]*\)"\].*/\1/p'
}
up=""
for _ in $(seq "$TIMEOUT"); do
  up=$(query "up{job=\"$JOB\"}" || true)
  [ "$up" = 1 ] && break
  sleep 1
done
failures=0
if [ "$up" = 1 ]; then
  say "ok: up{job=\"$JOB\"} == 1 after $(( $(date +%s) - started ))s"
else
  say "FAIL: up{job=\"$JOB\"} is '${up:-absent}'"
  failures=$((failures + 1))
fi
if [ "$(query "count(advguard_bundle_info{job=\"$JOB\"})" || true)" = 1 ]; then
  say "ok: advguard_bundle_info scraped"
else
  say "FAIL: no advguard_bundle_info from job $JOB"
  failures=$((failures + 1))
fi
if curl -sf "$PROMETHEUS/api/v1/rules" | grep -q '"name":"AdvguardApiDown"'; then
  say "ok: alert rules loaded"
else
  say "FAIL: alert rules not loaded"
  failures=$((failures + 1))
fi
# the api's tracker writes each client's statistics to the stack's Redis
redis=$(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=redis" | head -n1)
if curl -sf -o /dev/null -F "file=@$image" "$API/classify" && [ -n "$redis" ] \
  && [ "$(podman exec "$redis" redis-cli dbsize)" -gt 0 ]; then
  say "ok: POST /classify answered 200 and the client's statistics are in Redis"
else
  say "FAIL: POST /classify, or no keys in the stack's Redis afterwards"
  failures=$((failures + 1))
fi
if [ "$failures" -ne 0 ]; then
  compose ps >&2 || true
  for service in api-cpu redis prometheus; do compose logs --tail 15 "$service" >&2 || true; done
  die "$failures check(s) failed"
fi
say "all checks passed in $(( $(date +%s) - started ))s"
