#!/bin/sh
# Make sure the PostgreSQL and Redis the tests use are up; start them if installed, else explain.
set -u
pg_up() { "${PYTHON:-python3}" - <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(2)
sys.exit(s.connect_ex(("127.0.0.1", 5432)))
PY
}
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    sleep 2
  fi
fi
if ! pg_up; then
  echo "ERROR: PostgreSQL is not reachable at 127.0.0.1:5432 and could not be started." >&2
  echo "Install it (Debian/Ubuntu: apt-get install postgresql), allow trust auth for 127.0.0.1" >&2
  echo "and create a database named test, or set PG_URL=postgresql+psycopg://... for make test." >&2
  exit 1
fi
if ! redis_up; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    sleep 1
  fi
fi
if ! redis_up; then
  echo "ERROR: Redis is not reachable at 127.0.0.1:6379 and could not be started." >&2
  echo "Install it (Debian/Ubuntu: apt-get install redis-server) or start it on that port." >&2
  exit 1
fi
echo "PostgreSQL and Redis are up"
