# Shared by the PostgreSQL bench scripts: a throwaway PostgreSQL cluster (Debian's server, fsync
# on, defaults otherwise) in a temporary directory on PGPORT, stopped and removed on exit (call
# stop_pg from any EXIT trap that replaces this one). As root the server runs as the postgres
# user. Source it after `cd` to the repo root.
PGPORT=${PGPORT:-18295}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -n1)
PGDIR=$(mktemp -d "${TMPDIR:-/tmp}/offload-bench-pg.XXXXXX")
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$PGDIR"
as_pg "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U postgres >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -w -l "$PGDIR/log" \
  -o "-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
stop_pg() { as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$PGDIR"; }
trap stop_pg EXIT

fresh_db() {  # prints a URL of a new database
  local name="b_$RANDOM$RANDOM"
  psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE DATABASE $name" >/dev/null
  echo "postgres://postgres@127.0.0.1:$PGPORT/$name"
}

# start_instance PORT LOG FLAGS...: another offload (the first is start_offload's) in a data
# directory of its own; prints nothing, sets PID_LAST. Stop it with kill.
start_instance() {
  local port=$1 log=$2 data
  shift 2
  data=$(mktemp -d "${TMPDIR:-/tmp}/offload-bench.XXXXXX")
  ./target/release/offload --bind "127.0.0.1:$port" --data-dir "$data" "$@" >"$log" 2>&1 &
  PID_LAST=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return 0; sleep 0.05; done
  echo "the instance on $port did not start; see $log" >&2
  return 1
}
