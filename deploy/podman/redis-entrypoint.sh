#!/bin/sh
# As the official Redis image does: `redis-server` started without a config file accepts
# connections from other containers (protected mode off; bind stays Redis' default, all
# interfaces), so the compose file's command line runs unchanged.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no "$@"
fi
exec "$@"
