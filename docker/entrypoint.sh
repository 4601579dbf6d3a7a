#!/bin/sh
# nasq in a container: the broker URL is assembled from a secret (never baked into the image or
# the compose file), then the command runs as given (`worker ...`, `eval ...`, `flower ...`).
#   NASQ_BROKER_HOST   the Redis service (default: redis), port NASQ_BROKER_PORT (6379), db 0
#   /run/secrets/redis_password   its password (compose secret)
# `health` checks that the broker answers (the image's HEALTHCHECK).
set -eu
if [ -z "${NASQ_BROKER_URL:-}" ] && [ -f /run/secrets/redis_password ]; then
  NASQ_BROKER_URL="redis://:$(cat /run/secrets/redis_password)@${NASQ_BROKER_HOST:-redis}:${NASQ_BROKER_PORT:-6379}/0"
  export NASQ_BROKER_URL
fi
case "${1:-}" in
  health) exec python -c "from nasq.config import load_settings; from nasq.queue.broker import probe; probe(load_settings())" ;;
  python|sh|redis-server) exec "$@" ;;
  *) exec nasq "$@" ;;
esac
