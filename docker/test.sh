#!/usr/bin/env bash
# The container path end to end, offline, on a real Docker engine: base image from Debian
# packages, nasq image from a wheelhouse, a compose cluster (Redis with AOF and a password, a build
# worker, 2 CPU workers, Flower), an evaluation submitted from a container and from the host,
# each checked against the single-process reference image for image; then chaos across the
# containers: `docker kill` a worker mid-run, `docker network disconnect` a worker mid-run, restart
# the Redis container mid-run; each run must still equal the reference. Removes all it started.
#
#   sudo docker/test.sh            # about 9 minutes on a 2-core VM, the first image build included
#
# Needs root (dockerd, debootstrap); installs docker.io, docker-compose and debootstrap with apt
# when missing, and the host's client in .venv (the client install) when there is none. Not
# part of the default test command.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
say() { echo "[docker/test $(date +%H:%M:%S)] $*"; }

for tool in docker docker-compose debootstrap; do
  command -v "$tool" >/dev/null || { say "installing docker.io docker-compose debootstrap"; \
    apt-get install -y -q docker.io docker-compose debootstrap >/dev/null; break; }
done
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd"; (dockerd >/tmp/nasq-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi

T0=$(date +%s)
if [ ! -x .venv/bin/nasq ]; then  # the host's client (and pip, for the wheelhouse): the README's install
  say "host client: python3 -m venv .venv && .venv/bin/pip install -e ."
  python3 -m venv .venv && .venv/bin/pip install -q -e . 2>/dev/null
fi
PY=.venv/bin/python
docker/base.sh nasq-base:bookworm
EXTRAS=torch,build,onnxruntime,openvino,flower   # what the CPU image runs (docker/Dockerfile.cpu)
# torch's CPU-only build: from PyTorch's CPU index (TORCH_INDEX) or a wheel folder pip searches
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
if ! ls docker/wheelhouse/torch-*+cpu-*.whl >/dev/null 2>&1; then
  rm -rf docker/wheelhouse && mkdir -p docker/wheelhouse && touch docker/wheelhouse/.keep
  say "wheelhouse: pip wheel -w docker/wheelhouse '$TORCH' '.[$EXTRAS]' (dependencies, torch's CPU build)"
  "$PY" -m pip wheel -q -w docker/wheelhouse ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH" ".[$EXTRAS]" \
    2>/dev/null
  ls docker/wheelhouse/torch-*+cpu-*.whl >/dev/null 2>&1 || { say "the wheelhouse's torch is not a CPU build: set" \
    "TORCH_INDEX=https://download.pytorch.org/whl/cpu (or put torch's +cpu wheel in a folder pip searches)"; exit 1; }
fi
rm -f docker/wheelhouse/nasq-*.whl
"$PY" -m pip wheel -q --no-deps -w docker/wheelhouse . 2>/dev/null   # this checkout's nasq
# what Debian's Python 3.11.2 needs beyond the host's (redis: async-timeout below 3.11.3)
"$PY" -m pip download -q --no-deps -d docker/wheelhouse "async-timeout>=4.0.3" 2>/dev/null
say "building nasq:cpu from the wheelhouse (offline)"
TB=$(date +%s)
docker build -q --network host -f docker/Dockerfile.cpu --build-arg BASE=nasq-base:bookworm -t nasq:cpu . >/dev/null
say "image nasq:cpu built in $(( $(date +%s) - TB )) s: $(docker image inspect -f '{{.Size}}' nasq:cpu | awk '{printf "%.0f MB", $1/1e6}')"

WORK=$(mktemp -d /tmp/nasq-docker.XXXXXX)
export NASQ_SHARED=$WORK/shared NASQ_SECRETS=$WORK/secrets NASQ_REDIS_PORT=${NASQ_REDIS_PORT:-16379} \
       NASQ_FLOWER_PORT=${NASQ_FLOWER_PORT:-15555} NASQ_LEASE_S=6
mkdir -p "$NASQ_SHARED" "$NASQ_SECRETS"
chown 10001 "$NASQ_SHARED"
head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$NASQ_SECRETS/redis_password"
echo "ops:$(head -c 12 /dev/urandom | base64 | tr -d '/+=')" > "$NASQ_SECRETS/flower_users"
chmod 644 "$NASQ_SECRETS"/*
DC=(docker-compose -p nasqtest -f docker/compose.yml)
cleanup() {
  say "removing the cluster and $WORK"
  "${DC[@]}" --profile tool down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say "compose up: redis, build worker, 2 workers, flower"
"${DC[@]}" up -d --scale worker=2 >/dev/null
for _ in $(seq 90); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' nasqtest_flower_1 2>/dev/null)" = healthy ] && break; sleep 2
done
run() { "${DC[@]}" run --rm -T tool "$@"; }
say "data: 1200 generated images and a tiny calibrated checkpoint in $NASQ_SHARED/demo"
run python -c "from nasq.demo import prepare; prepare('$NASQ_SHARED/demo', 1200, arch='tiny', batch_size=8, log=lambda *_: None)"
D=$NASQ_SHARED/demo
ARGS=(--weights "$D/nasnetalarge-random-tiny.pth" --data "$D/val" --labels "$D/val_label.txt" -b 8 --no-progress)
say "the single-process reference"
run python -c "
import json; from nasq.api import evaluate_local
json.dump(evaluate_local(weights='$D/nasnetalarge-random-tiny.pth', data='$D/val', labels='$D/val_label.txt', batch_size=8), open('$NASQ_SHARED/ref.json', 'w'))"

same() {  # predictions file vs the reference, image for image
  "$PY" - "$1" "$NASQ_SHARED/ref.json" "$2" <<'PYEOF'
import json, sys
got, ref = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
assert got["names"] == ref["names"] and got["top5"] == ref["top5"], f"{sys.argv[3]}: predictions differ"
print(f"[docker/test] {sys.argv[3]}: {len(got['names'])} images, equal to the reference image for image")
PYEOF
}
say "eval submitted from a container"
run eval "${ARGS[@]}" --json "$NASQ_SHARED/r1.json" --predictions "$NASQ_SHARED/p1.json" >/dev/null
same "$NASQ_SHARED/p1.json" "from a container"
HOST_URL="redis://:$(cat "$NASQ_SECRETS/redis_password")@127.0.0.1:$NASQ_REDIS_PORT/0"
host_eval() {  # $1: tag; the rest: extra flags
  local tag=$1; shift
  NASQ_BROKER_URL=$HOST_URL NASQ_REPORT_DIR=$NASQ_SHARED/reports NASQ_ARTIFACT_DIR=$NASQ_SHARED/artifacts \
    "$REPO/.venv/bin/nasq" eval "${ARGS[@]}" --predictions "$NASQ_SHARED/$tag.json" "$@"
}
say "eval submitted from the host"
host_eval p2 >/dev/null 2>&1
same "$NASQ_SHARED/p2.json" "from the host"

W1=nasqtest_worker_1
victim_busy() {  # until a worker of container $1 runs a shard of the run its client ($2: log) submitted
  "$PY" - "$HOST_URL" "$(docker inspect -f '{{.Config.Hostname}}' "$1")" "$2" <<'PYEOF'
import re, sys, time
from nasq.queue.store import RunStore
url, host, log = sys.argv[1:]
store, deadline = RunStore(url), time.time() + 300
while time.time() < deadline:
    found = re.search(r"run (\S+): \d+ images in", open(log).read())
    if found and any(r["worker"].endswith("@" + host) for r in store.running(found.group(1)).values()):
        print(found.group(1))
        sys.exit(0)
    time.sleep(0.2)
sys.exit("the victim never took a shard")
PYEOF
}
felt() {  # the fault was felt: a shard sent again, started twice, or the client rode out an outage
  "$PY" - "$HOST_URL" "$1" "$2" <<'PYEOF'
import json, sys
from nasq.queue.store import RunStore
url, run_id, log = sys.argv[1:]
store = RunStore(url)
again, twice = store.redispatched(run_id), {s: n for s, n in store.attempts(run_id).items() if n > 1}
outage = [line.strip() for line in open(log) if "lost the broker" in line or "dispatched again" in line]
print(f"    felt: dispatched again {again or 'none'}, started twice {twice or 'none'}, client: {outage[:2] or 'none'}")
sys.exit(0 if again or twice or outage else "the fault was not felt: it proved nothing")
PYEOF
}
chaos() {  # $1: name; $2: the fault (a shell command), run once the victim is running a shard of the run
  local name=$1 fault=$2
  host_eval "c-$name" --shard-size 16 --json "$NASQ_SHARED/c-$name.report.json" >"$WORK/$name.log" 2>&1 &
  local pid=$! run_id
  run_id=$(victim_busy "$W1" "$WORK/$name.log") || { cat "$WORK/$name.log"; say "FAILED: $name"; exit 1; }
  say "chaos: $name (run $run_id, $W1 busy)"
  eval "$fault"
  wait "$pid" || { cat "$WORK/$name.log"; say "FAILED: $name"; exit 1; }
  same "$NASQ_SHARED/c-$name.json" "chaos $name"
  felt "$run_id" "$WORK/$name.log" || { say "FAILED: $name"; exit 1; }
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print('    report:', r['images'], 'images,', \
    r['wall_s'], 's over the shards, dispatched again:', r.get('redispatched_shards') or 'none')" \
    "$NASQ_SHARED/c-$name.report.json"
}
chaos "docker kill a worker" "docker kill $W1 >/dev/null"
docker start $W1 >/dev/null
chaos "disconnect a worker from the network" \
  "docker network disconnect nasqtest_default $W1; sleep 20; docker network connect nasqtest_default $W1"
chaos "restart the Redis container" "docker restart nasqtest_redis_1 >/dev/null"
say "all passed in $(( $(date +%s) - T0 )) s"
