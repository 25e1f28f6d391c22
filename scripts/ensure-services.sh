#!/usr/bin/env bash
# Start Redis and PostgreSQL on 127.0.0.1 if they are not answering.
set -uo pipefail
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "imgfarm: starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/imgfarm-redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
if command -v pg_isready >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_isready >/dev/null 2>&1; then
  isready=$(command -v pg_isready || ls /usr/lib/postgresql/*/bin/pg_isready | head -1)
  if ! "$isready" -h 127.0.0.1 -p 5432 -q; then
    echo "imgfarm: starting PostgreSQL"
    ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    if [ -n "$ver" ]; then
      pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    fi
    for _ in $(seq 100); do "$isready" -h 127.0.0.1 -p 5432 -q && break; sleep 0.1; done
  fi
  # The tests connect as postgres over TCP; make sure that works (trust or a known password).
  if ! psql "postgresql://postgres@127.0.0.1:5432/postgres" -Atc 'select 1' >/dev/null 2>&1 \
     && ! PGPASSWORD=imgfarm psql "postgresql://postgres@127.0.0.1:5432/postgres" -Atc 'select 1' >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
      runuser -u postgres -- psql -qc "ALTER USER postgres PASSWORD 'imgfarm'" >/dev/null || true
    fi
  fi
fi
exit 0
