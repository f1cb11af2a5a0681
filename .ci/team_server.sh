#!/usr/bin/env bash
# A team tracking server on this machine's loopback, as a lab runs one: PostgreSQL (the Debian package)
# as MLflow's backend store and a folder as the shared artifact root, served by `mlflow server`.
#
#   eval "$(bash .ci/team_server.sh start DIR)"   # installs PostgreSQL if missing, starts both, prints
#                                                 # the export lines the integration test reads
#   bash .ci/team_server.sh stop DIR              # stops both (DIR holds the database, logs, artifacts)
#
# Ports: MEDTRICKS_PG_PORT (default 54329), MEDTRICKS_MLFLOW_PORT (default 5055). Everything it says
# goes to stderr; stdout is only the export lines.
set -euo pipefail
cmd="${1:?usage: team_server.sh start|stop DIR}"
dir="${2:?usage: team_server.sh start|stop DIR}"
pg_port="${MEDTRICKS_PG_PORT:-54329}"
ml_port="${MEDTRICKS_MLFLOW_PORT:-5055}"
say() { echo "team_server: $*" >&2; }

pg_bin() {
  local initdb
  initdb="$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$initdb" ] && dirname "$initdb"
}

as_db_user() {  # PostgreSQL refuses to run as root: use the package's postgres account then
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "$cmd" = stop ]; then
  # the server and its worker processes: one process group (setsid)
  if [ -f "$dir/mlflow.pid" ]; then
    group="$(cat "$dir/mlflow.pid")"
    kill -- "-$group" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$group" 2>/dev/null || break; sleep 0.5; done
    kill -9 -- "-$group" 2>/dev/null || true  # still there after 10 s: no graceful end
  fi
  bin="$(pg_bin || true)"
  if [ -n "$bin" ] && [ -d "$dir/pgdata" ]; then as_db_user "$bin/pg_ctl" -D "$dir/pgdata" -m fast stop >&2 || true; fi
  exit 0
fi
[ "$cmd" = start ] || { say "unknown command $cmd (start|stop)"; exit 2; }

if [ -z "$(pg_bin || true)" ]; then
  say "installing PostgreSQL (Debian package)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql >&2
fi
bin="$(pg_bin)"
mkdir -p "$dir/artifacts" "$dir/sock"
chmod 755 "$dir"  # the postgres account must reach its data folder inside it
if [ "$(id -u)" = 0 ]; then chown postgres "$dir/sock"; fi
if [ ! -d "$dir/pgdata" ]; then
  mkdir -p "$dir/pgdata"
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir/pgdata"; fi
  # trust on loopback only: a CI database; a lab's server uses password or cert auth (README).
  as_db_user "$bin/initdb" -D "$dir/pgdata" -U mlflow -A trust -E UTF8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
fi
as_db_user "$bin/pg_ctl" -D "$dir/pgdata" -l "$dir/sock/postgres.log" -w \
  -o "-p $pg_port -k $dir/sock -c listen_addresses=127.0.0.1" start >&2
"$bin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='mlflow'" \
  | grep -q 1 || "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow
pg_uri="postgresql://mlflow@127.0.0.1:$pg_port/mlflow"

# MLflow creates its tables on first start; artifacts are proxied (--artifacts-destination), so clients
# need no access to the folder, only to the server.
MLFLOW_DISABLE_TELEMETRY=true setsid nohup mlflow server --backend-store-uri "$pg_uri" \
  --artifacts-destination "$dir/artifacts" --host 127.0.0.1 --port "$ml_port" --workers 2 \
  >"$dir/mlflow.log" 2>&1 &
echo $! >"$dir/mlflow.pid"
url="http://127.0.0.1:$ml_port"
for _ in $(seq 1 120); do
  if python -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$url" 2>/dev/null; then
    say "MLflow on $url, backend $pg_uri, artifacts $dir/artifacts"
    echo "export MEDTRICKS_TEST_MLFLOW_SERVER=$url"
    echo "export MEDTRICKS_TEST_POSTGRES_URI=$pg_uri"
    exit 0
  fi
  if ! kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null; then break; fi
  sleep 1
done
say "the MLflow server did not come up; its log:"; tail -30 "$dir/mlflow.log" >&2
exit 1
