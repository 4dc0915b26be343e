#!/usr/bin/env bash
# Make sure the services the tests talk to are up: Redis and PostgreSQL on loopback.
# Starts them when they are installed but down; fails with a clear message otherwise.
set -euo pipefail

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! redis_up; then
  if command -v redis-server >/dev/null; then
    echo "starting redis-server on 127.0.0.1:6379"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  fi
  redis_up || { echo "error: Redis is not reachable on 127.0.0.1:6379 and could not be started (apt-get install redis-server)" >&2; exit 1; }
fi

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 100); do pg_up && break; sleep 0.1; done
  fi
  pg_up || { echo "error: PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started (apt-get install postgresql)" >&2; exit 1; }
fi
echo "services: redis and postgresql are up"
