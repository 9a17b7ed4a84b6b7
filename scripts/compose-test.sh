#!/usr/bin/env bash
# docker-compose.yml for real, as CI runs it (root, this machine kind, no image registry):
#   1. installs docker.io, a compose (the `docker compose` plugin if present, else Debian's docker-compose v1),
#      debootstrap and curl; starts dockerd if none answers (and stops only that one at the end);
#   2. builds a Debian bookworm base image with debootstrap (fedmri-base:local, the host's CA bundle in it so
#      pip in the build trusts the registry proxy) and the project image from deploy/Dockerfile with the
#      host's CPU torch wheel; both are reused when present (the project image is tagged by a hash of its inputs);
#   3. pass 1, plain compose: a small federation (3 sites, tiny data and model, 2 rounds) from ONE `up`
#      (data -> SuperLink/SuperNodes/SuperExecs -> federate -> report -> API), then over HTTP on 127.0.0.1:
#      401 without the key, /readyz, a test volume segmented by the API container, the report cached;
#   4. pass 2, deploy/compose.tls.yml: certificates and node keys from deploy/gen-certs.sh and
#      deploy/gen-node-keys.sh, SuperNodes authenticated; one site's containers are killed after round 1 and
#      the run must still finish with the others (the site recorded missing) and be served;
#   5. `down -v` after each pass; prints ONE summary line (the full log is kept in build/compose-test.log).
# Sizes (environment): CT_SITES (3), CT_ROUNDS (2), CT_SCALE_CASES (0.3), CT_FEDERATE_ARGS, CT_REPORT_ARGS,
# CT_TIMEOUT (seconds per pass, 2400), CT_PASSES ("plain tls"; bench/bench_compose.py runs "plain" only).
# Exit code 0 only when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)
mkdir -p build
LOG=$ROOT/build/compose-test.log
: > "$LOG"
WORK=$(mktemp -d /tmp/fedmri-compose-test.XXXXXX)
STARTED_DOCKERD=""
UP_PID=""
PROJECTS=()
STEP="start"
TIMES=()

SITES_N=${CT_SITES:-3}
ROUNDS=${CT_ROUNDS:-2}
SCALE=${CT_SCALE_CASES:-0.3}
PASS_TIMEOUT=${CT_TIMEOUT:-2400}
PASSES=" ${CT_PASSES:-plain tls} "
ALL_SITES=(hospital-a hospital-b hospital-c hospital-d)
SITES=("${ALL_SITES[@]:0:$SITES_N}")
VICTIM=${SITES[$((SITES_N - 1))]}
FEDERATE_ARGS=${CT_FEDERATE_ARGS:-"--rounds $ROUNDS --local-epochs 1 --min-sites 2 --set roi-size=32,32,32 \
--set spacing=4,4,4 --set channels=8,16,32 --set samples-per-volume=1 --set round-timeout=900"}
REPORT_ARGS=${CT_REPORT_ARGS:-"--k 1 --no-stops --bootstrap 100 --no-predictions"}

log() { echo "[$(($(date +%s) - T0))s] $*" >> "$LOG"; }
elapsed() { echo $(($(date +%s) - $1)); }

cleanup() {
  local rc=$?
  set +e
  [ -n "$UP_PID" ] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null
  for p in "${PROJECTS[@]}"; do [ -z "$p" ] || compose_down "$p"; done
  [ -n "${CG_SHARES:-}" ] && echo "$CG_SHARES" > "$CG/cpu.shares"
  if [ -n "$STARTED_DOCKERD" ]; then
    log "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
    kill "$STARTED_DOCKERD" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -rf "$WORK"
  if [ $rc -ne 0 ]; then
    tail -n 80 "$LOG" >&2
    echo "compose-test: FAIL at ${STEP} after $(elapsed "$T0")s (log: $LOG)"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { log "FAIL: $*"; STEP="$STEP: $*"; exit 1; }
run() { log "\$ $*"; "$@" >> "$LOG" 2>&1; }

# ---- 1. tools and engine ----------------------------------------------------------------------------
STEP="install"
need=()
command -v dockerd > /dev/null || need+=(docker.io)
command -v debootstrap > /dev/null || need+=(debootstrap)
command -v curl > /dev/null || need+=(curl)
if ! docker compose version > /dev/null 2>&1 && ! command -v docker-compose > /dev/null; then need+=(docker-compose); fi
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "needs root to install ${need[*]}"
  run apt-get update -qq
  DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq "${need[@]}"
fi
if docker compose version > /dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0   # no buildx here: the legacy builder
log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version 2>&1 | head -1))"

STEP="dockerd"
if ! docker info > /dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "no Docker engine answers and starting dockerd needs root"
  dockerd > "$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  log "started dockerd (pid $STARTED_DOCKERD)"
  for _ in $(seq 120); do docker info > /dev/null 2>&1 && break; sleep 0.5; done
  docker info > /dev/null 2>&1 || { cat "$WORK/dockerd.log" >> "$LOG"; fail "dockerd did not answer within 60s"; }
fi

# cgroup v1: all containers share the "docker" cpu group, which competes with every host process as ONE
# process. On a host busy with other work (a shared 2-core machine at load 40) that starved the federation:
# Flower stops a ClientApp whose task heartbeat is 60 s late. Weigh the group as CT_CPU_WEIGHT (8) processes
# for the run (restored at the end); an idle CI machine is not affected.
CG=/sys/fs/cgroup/cpu/docker
if [ "$(id -u)" = 0 ] && [ -d /sys/fs/cgroup/cpu ] && [ ! -d /sys/fs/cgroup/cpu/system.slice ]; then
  mkdir -p "$CG" 2> /dev/null || true
  if [ -w "$CG/cpu.shares" ]; then
    CG_SHARES=$(cat "$CG/cpu.shares")
    echo $((1024 * ${CT_CPU_WEIGHT:-8})) > "$CG/cpu.shares" && log "docker cpu group weight $(cat "$CG/cpu.shares")"
  fi
fi

# ---- 2. images --------------------------------------------------------------------------------------
STEP="base image"
t=$(date +%s)
BASE=${FEDMRI_BASE_IMAGE:-fedmri-base:local}
if ! docker image inspect "$BASE" > /dev/null 2>&1; then
  [ "$BASE" = fedmri-base:local ] || fail "base image $BASE not found"
  [ "$(id -u)" = 0 ] || fail "debootstrap needs root"
  run debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
    || fail "debootstrap failed"
  # The host's CA bundle: it holds the CA of the proxy the package registries are reached through.
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$WORK/rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$BASE" >> "$LOG" 2>&1 \
    || fail "docker import failed"
  rm -rf "$WORK/rootfs"
fi
TIMES+=("base $(elapsed "$t")s")

STEP="project image"
t=$(date +%s)
hash=$( { docker image inspect -f '{{.Id}}' "$BASE";
          find pyproject.toml README.md deploy/Dockerfile shared server client -type f ! -path '*/__pycache__/*' \
            ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-12)
IMAGE=fedmri:compose-test-$hash
if ! docker image inspect "$IMAGE" > /dev/null 2>&1; then
  if ! ls deploy/local/torch-2.13.0*.whl > /dev/null 2>&1; then   # the host's CPU wheel, else PyTorch's CPU index
    run python3 -m pip download --no-deps torch==2.13.0 -d deploy/local || log "no local torch wheel"
  fi
  # The dependency list alone: a pyproject.toml edit that keeps it reuses the dependency layer.
  python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > deploy/local/requirements.txt
  run docker build -f deploy/Dockerfile --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" . || fail "docker build failed"
  for old in $(docker images --format '{{.Repository}}:{{.Tag}}' fedmri | grep '^fedmri:compose-test-'); do
    [ "$old" = "$IMAGE" ] || docker rmi "$old" > /dev/null 2>&1 || true
  done
fi
TIMES+=("image $(elapsed "$t")s")

# ---- helpers for the passes -------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
compose() { "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" "$@"; }
compose_down() {
  local p=$1
  log "down -v $p"
  "${COMPOSE[@]}" -p "$p" -f docker-compose.yml -f deploy/compose.tls.yml down -v --remove-orphans -t 5 >> "$LOG" 2>&1
  PROJECTS=("${PROJECTS[@]/$p}")
}
cid() { compose ps -q "$1" 2>/dev/null | head -1; }
api() { curl -sS -o "$WORK/body" -w '%{http_code}' -H "X-API-Key: $FEDMRI_API_KEY" "$@"; }

export FEDMRI_IMAGE=$IMAGE FEDMRI_API_KEY=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export FEDMRI_SITES
FEDMRI_SITES=$(IFS=,; echo "${SITES[*]}")
export FEDMRI_GENERATE_ARGS="--scale-cases $SCALE" FEDMRI_FEDERATE_ARGS="$FEDERATE_ARGS"
export FEDMRI_REPORT_ARGS="$REPORT_ARGS"
SERVICES=(data superlink serverapp federate report api)
for s in "${SITES[@]}"; do SERVICES+=("supernode-$s" "clientapp-$s"); done

# Start one pass in the background (`up -d` returns once the API started, i.e. after federate and report).
start_pass() {
  PROJECT=$1; shift
  FILES=("$@")
  PROJECTS+=("$PROJECT")
  export FEDMRI_API_PORT
  FEDMRI_API_PORT=$(free_port)
  compose down -v --remove-orphans -t 5 >> "$LOG" 2>&1 || true   # leftovers of an interrupted run
  log "up -d $PROJECT (${FILES[*]}), API on 127.0.0.1:$FEDMRI_API_PORT"
  PASS_T0=$(date +%s)
  compose up -d --no-build "${SERVICES[@]}" >> "$LOG" 2>&1 &
  UP_PID=$!
}

# Wait for `up -d` (every one-shot step succeeded and the API runs), then for the API to be ready.
finish_pass() {
  local rc=0
  while kill -0 "$UP_PID" 2>/dev/null; do
    [ "$(elapsed "$PASS_T0")" -lt "$PASS_TIMEOUT" ] || fail "$PROJECT: not up within ${PASS_TIMEOUT}s"
    sleep 3
  done
  wait "$UP_PID" || rc=$?
  UP_PID=""
  for s in data federate report; do log "--- $s logs"; compose logs --no-color "$s" >> "$LOG" 2>&1 || true; done
  [ $rc -eq 0 ] || fail "$PROJECT: compose up failed (exit $rc)"
  for _ in $(seq 120); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$FEDMRI_API_PORT/readyz")" = 200 ] && break
    sleep 1
  done
  [ "$(api "http://127.0.0.1:$FEDMRI_API_PORT/readyz")" = 200 ] || fail "$PROJECT: API not ready: $(cat "$WORK/body")"
  READY_S=$(elapsed "$PASS_T0")
  MODEL=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["model_version"])' "$WORK/body")
  log "$PROJECT: model $MODEL served after ${READY_S}s"
  for s in data federate report; do
    code=$(docker inspect -f '{{.State.ExitCode}}' "$(cid "$s")")
    [ "$code" = 0 ] || fail "$PROJECT: $s exited with $code"
  done
  # to a file first: `grep -q` stops reading at the match, and with pipefail the writer's SIGPIPE failed the check
  compose logs --no-color federate > "$WORK/federate.log"
  grep -q "done: $MODEL (served)" "$WORK/federate.log" || fail "$PROJECT: federate did not serve $MODEL"
}

# ---- 3. pass 1: plain compose, the whole chain from one `up` ----------------------------------------
STEP="pass 1 (plain)"
start_pass fedmrict1 -f docker-compose.yml
finish_pass
P1=$READY_S
MODEL1=$MODEL
URL=http://127.0.0.1:$FEDMRI_API_PORT
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/models")" = 401 ] || fail "API answered without its key"
[ "$(api "$URL/v1/models")" = 200 ] || fail "GET /v1/models: $(cat "$WORK/body")"
published=$(docker port "$(cid api)" 8080/tcp)
[[ "$published" == "127.0.0.1:$FEDMRI_API_PORT" ]] || fail "API published on '$published', not loopback only"
[ "$(docker network inspect -f '{{.Internal}}' "$(docker inspect -f \
  '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$(cid superlink)")")" = true ] \
  || fail "the federation network is not internal"
# A held-out volume of one site, copied out of the stopped data container's volume, segmented over HTTP.
docker cp "$(cid data):/data/${SITES[1]}/imagesTs" "$WORK/ts" >> "$LOG" 2>&1 || fail "docker cp of test cases"
volume=$(find "$WORK/ts" -name '*.nii.gz' | sort | head -1)
[ -n "$volume" ] || fail "no test volume in ${SITES[1]}"
code=$(curl -sS -o "$WORK/seg.nii.gz" -w '%{http_code}' -H "X-API-Key: $FEDMRI_API_KEY" -F "file=@$volume" \
  "$URL/v1/segment")
[ "$code" = 200 ] || fail "POST /v1/segment: $code $(head -c 300 "$WORK/seg.nii.gz")"
[ "$(head -c 2 "$WORK/seg.nii.gz" | od -An -tx1 | tr -d ' ')" = 1f8b ] || fail "segmentation is not a .nii.gz"
[ "$(api -F "file=@$volume" "$URL/v1/segment/summary")" = 200 ] || fail "summary: $(cat "$WORK/body")"
python3 - "$WORK/body" "$MODEL" >> "$LOG" 2>&1 <<'EOF' || fail "summary JSON"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["model_version"] == sys.argv[2], s
print("segment summary:", {k: s[k] for k in ("model_version", "volumes_ml") if k in s})
EOF
code=$(curl -sS -D "$WORK/headers" -o "$WORK/report.json" -w '%{http_code}' -H "X-API-Key: $FEDMRI_API_KEY" \
  "$URL/v1/report?format=json")
[ "$code" = 200 ] || fail "GET /v1/report: $code $(head -c 300 "$WORK/report.json")"
grep -qi '^x-report-cached: true' "$WORK/headers" || fail "the report step's report is not what the API serves"
python3 - "$WORK/report.json" "$FEDMRI_SITES" >> "$LOG" 2>&1 <<'EOF' || fail "report JSON"
import json, sys
r = json.load(open(sys.argv[1]))
sites = sorted(row["site"] for row in r["sites"])
assert sites == sorted(sys.argv[2].split(",")), sites
print("report sites:", sites)
EOF
SEGMENT="segment ok"
compose_down fedmrict1
TIMES+=("pass1 $(elapsed "$PASS_T0")s")

# ---- 4. pass 2: TLS + SuperNode authentication, one site killed mid-run -----------------------------
TLS_SUMMARY="TLS+node auth: not run (CT_PASSES)"
if [[ "$PASSES" == *" tls "* ]]; then
STEP="pass 2 (TLS + auth, ${VICTIM} killed)"
run deploy/gen-certs.sh "$WORK/certs" || fail "gen-certs.sh"
run deploy/gen-node-keys.sh "$WORK/keys" "${ALL_SITES[@]}" || fail "gen-node-keys.sh"
chown 1000 "$WORK/certs/server.key" "${ALL_SITES[@]/#/$WORK/keys/}"   # the containers' user reads its key
export FEDMRI_CERTS_DIR=$WORK/certs FEDMRI_KEYS_DIR=$WORK/keys
start_pass fedmrict2 -f docker-compose.yml -f deploy/compose.tls.yml
killed="" f="" victims=""
while [ -z "$killed" ]; do
  kill -0 "$UP_PID" 2>/dev/null || break
  [ "$(elapsed "$PASS_T0")" -lt "$PASS_TIMEOUT" ] || fail "no round 1 within ${PASS_TIMEOUT}s"
  [ -n "$f" ] || f=$(cid federate)
  if [ -z "$victims" ]; then
    sn=$(cid "supernode-$VICTIM") ca=$(cid "clientapp-$VICTIM")
    [ -n "$sn" ] && [ -n "$ca" ] && victims="$sn $ca"
  fi
  if [ -n "$f" ] && [ -n "$victims" ] && docker logs "$f" 2>&1 | grep -q '^round 1 ('; then
    # shellcheck disable=SC2086
    run docker kill $victims || fail "docker kill"
    killed=$(elapsed "$PASS_T0")
    log "killed $VICTIM's SuperNode and ClientApp SuperExec after round 1 (${killed}s)"
  fi
  sleep 0.5
done
[ -n "$killed" ] || fail "the run ended before round 1 was seen"
finish_pass
TLS_SUMMARY="TLS+node auth: $VICTIM killed after round 1, finished with the others, served ${READY_S}s after up"
compose logs --no-color register > "$WORK/register.log"
grep -q "registered /keys/${SITES[0]}.pub" "$WORK/register.log" || fail "node keys not registered"
compose logs --no-color superlink >> "$LOG" 2>&1 || true
compose logs --no-color federate | grep -E "missing this round: .*$VICTIM|! $VICTIM (failed|no reply)" >> "$LOG" \
  || fail "$VICTIM not recorded missing or failed after the kill"
[ "$(docker inspect -f '{{.State.Running}}' "$(cid "supernode-$VICTIM")")" = false ] \
  || fail "$VICTIM's SuperNode was restarted"
compose_down fedmrict2
TIMES+=("pass2 $(elapsed "$PASS_T0")s")
fi

STEP="done"
echo "compose-test: PASS in $(elapsed "$T0")s (${COMPOSE[*]}; $SITES_N sites, $ROUNDS rounds; plain: model $MODEL1" \
  "served ${P1}s after up, 401 without key, $SEGMENT, report cached; $TLS_SUMMARY; ${TIMES[*]}; log $LOG)"
