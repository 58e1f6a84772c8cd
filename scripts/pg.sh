#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests: made in a temporary
# directory, run as an unprivileged user on a loopback port, stopped and
# removed at the end (also on failure or Ctrl-C), by its pid.
#
#   scripts/pg.sh                    start one, print its URL, wait for Ctrl-C
#   scripts/pg.sh CMD [ARGS...]      run CMD with PILOT_TEST_PG=<its URL>, then
#                                    stop it; exits with CMD's status
#   scripts/pg.sh init DIR           only make a cluster in DIR (owned by the
#                                    user); netns-tests/s25 runs it itself
#   scripts/pg.sh serve DIR PORT     run DIR's server in the foreground as the
#                                    user, on 127.0.0.1:PORT (exec: the caller's
#                                    pid is the server's)
#   scripts/pg.sh url DIR PORT       wait (30 s at most) until that server
#                                    answers, make the database, print its URL
#
# The server binaries come from Debian's `postgresql` package, installed
# here if missing (root). The cluster user is PG_USER (default `nobody`:
# PostgreSQL refuses to run as root); the database superuser is `pilot`
# with a random password, the database `pilot`, and only password (SCRAM)
# logins are accepted. The cluster leaves nothing behind (it never touches
# /var/lib/postgresql or a system service; installing the package may
# start Debian's own cluster on port 5432, which this one never uses).
set -euo pipefail

PG_USER=${PG_USER:-nobody}

die() { echo "scripts/pg.sh: $*" >&2; exit 1; }

# The newest installed server's bin directory.
pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  [ -n "$d" ] && [ -x "$d/postgres" ] || return 1
  echo "$d"
}

install_if_missing() {
  pg_bin >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not installed: run as root, or 'apt-get install postgresql'"
  echo "scripts/pg.sh: installing postgresql (Debian package)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  pg_bin >/dev/null || die "postgresql installed, but no server under /usr/lib/postgresql/*/bin"
}

# as_user CMD...: run CMD as PG_USER (setpriv execs: no process in between).
as_user() {
  if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid="$PG_USER" --regid="$(id -g "$PG_USER")" --clear-groups -- "$@"
  else
    "$@"   # already unprivileged: run as ourselves
  fi
}

# init DIR: a cluster in DIR/data, the password in DIR/password.
init_cluster() {
  local dir=$1 bin
  bin=$(pg_bin)
  mkdir -p "$dir"
  head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$dir/password"
  [ "$(id -u)" -ne 0 ] || chown -R "$PG_USER" "$dir"
  chmod 700 "$dir"
  as_user "$bin/initdb" -D "$dir/data" -U pilot --pwfile="$dir/password" \
    --auth=scram-sha-256 --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed in $dir"; }
}

# serve DIR PORT: the server in the foreground, loopback only, its socket in DIR.
serve() {
  local dir=$1 port=$2 bin
  bin=$(pg_bin)
  # fsync stays on: the tests count on what was acknowledged being kept.
  local cmd=("$bin/postgres" -D "$dir/data" -h 127.0.0.1 -p "$port" -k "$dir"
             -c max_connections=200 -c shared_buffers=32MB)
  if [ "$(id -u)" -eq 0 ]; then
    exec setpriv --reuid="$PG_USER" --regid="$(id -g "$PG_USER")" --clear-groups -- "${cmd[@]}"
  fi
  exec "${cmd[@]}"
}

# url DIR PORT
url() { echo "postgres://pilot:$(cat "$1/password")@127.0.0.1:$2/pilot"; }

# ready DIR PORT: the server answers on its port.
ready() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$2" -U pilot; }

# ready_url DIR PORT [PID]: wait until the server answers (and, given its
# pid, fail at once if it exits), make the database `pilot`, print the URL.
ready_url() {
  local dir=$1 port=$2 pid=${3:-} i
  for ((i = 0; i < 300; i++)); do
    ready "$dir" "$port" && break
    [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null || { cat "$dir/server.log" >&2 || true; die "the server exited at start"; }
    sleep 0.1
  done
  ready "$dir" "$port" || die "the server on 127.0.0.1:$port did not answer within 30 s"
  PGPASSWORD=$(cat "$dir/password") "$(pg_bin)/psql" -q -h 127.0.0.1 -p "$port" -U pilot -d postgres \
    -v ON_ERROR_STOP=1 -c 'CREATE DATABASE pilot' >/dev/null
  url "$dir" "$port"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "${1:-}" in
  init)
    [ $# -eq 2 ] || die "usage: scripts/pg.sh init DIR"
    install_if_missing
    init_cluster "$2"
    exit 0 ;;
  serve)
    [ $# -eq 3 ] || die "usage: scripts/pg.sh serve DIR PORT"
    serve "$2" "$3" ;;
  url)
    [ $# -eq 3 ] || die "usage: scripts/pg.sh url DIR PORT"
    ready_url "$2" "$3"
    exit 0 ;;
esac

install_if_missing
DIR=$(mktemp -d /tmp/pilot-pg.XXXX)
PG_PID=
stop() {
  local rc=$? i
  set +e
  if [ -n "$PG_PID" ]; then
    # SIGINT: PostgreSQL's fast shutdown (clients disconnected, clean stop).
    kill -INT "$PG_PID" 2>/dev/null
    for ((i = 0; i < 100; i++)); do kill -0 "$PG_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$PG_PID" 2>/dev/null && { echo "scripts/pg.sh: server $PG_PID did not stop; SIGKILL" >&2; kill -9 "$PG_PID"; }
    wait "$PG_PID" 2>/dev/null
  fi
  rm -rf "$DIR"
  exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT TERM

init_cluster "$DIR"
PORT=$(free_port)
serve "$DIR" "$PORT" >"$DIR/server.log" 2>&1 &
PG_PID=$!
export PILOT_TEST_PG
PILOT_TEST_PG=$(ready_url "$DIR" "$PORT" "$PG_PID")
echo "scripts/pg.sh: PostgreSQL $(basename "$(dirname "$(pg_bin)")") (pid $PG_PID) at $PILOT_TEST_PG" >&2

if [ $# -eq 0 ]; then
  echo "$PILOT_TEST_PG"
  echo "scripts/pg.sh: Ctrl-C stops it and removes $DIR" >&2
  while kill -0 "$PG_PID" 2>/dev/null; do sleep 1; done
  die "the server exited"
fi
rc=0
"$@" || rc=$?
exit "$rc"
