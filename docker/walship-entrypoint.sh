#!/usr/bin/env bash
# walship-entrypoint.sh: the ENTRYPOINT of walship's PostgreSQL image (see ../Dockerfile).
#
# It wraps the official image's docker-entrypoint.sh. When the container runs the server
# (`postgres ...`, or only flags), it first:
#   1. checks this script's own settings (below); a bad one stops the start with one line;
#   2. checks walship's settings from the environment (WALSHIP_REPO, AZURE_*,
#      WALSHIP_ENCRYPTION_KEY_FILE, ...) with `walship check`: a configuration error stops
#      the start with walship's one-line reason; an unreachable repository is a warning,
#      unless a restore needs it (a database that is already there still starts: archiving
#      retries until the repository is back);
#   3. with WALSHIP_RESTORE set and PGDATA empty (or absent), restores it with
#      `walship restore` before PostgreSQL ever starts on it.
# Then it hands over to docker-entrypoint.sh, which initialises an empty PGDATA (running
# /docker-entrypoint-initdb.d/*, where initdb-walship.sh turns archiving on) or starts the
# existing or restored one. Any other command (`bash`, `walship ...`) is passed through.
#
# Settings (environment):
#   WALSHIP_RESTORE                 unset: no restore. LATEST or a backup name: restore an
#                                   empty PGDATA from the repository before the first start.
#   WALSHIP_RESTORE_TARGET_TIME     optional: recover to this time (with a time zone).
#   WALSHIP_RESTORE_STANDBY         on: come up as a standby fed by the archive (default off).
#   WALSHIP_RESTORE_TARGET_ACTION   at the target: promote (default), pause or shutdown.
#   WALSHIP_ARCHIVE_TIMEOUT         seconds, the archive_timeout set on first init (60).
# For tests outside a container:
#   WALSHIP_BIN (default /opt/walship/bin/walship), WALSHIP_PG_ENTRYPOINT (default
#   docker-entrypoint.sh), WALSHIP_GOSU (default gosu).
set -Eeuo pipefail

me=walship-entrypoint
WALSHIP_BIN=${WALSHIP_BIN:-/opt/walship/bin/walship}
PG_ENTRYPOINT=${WALSHIP_PG_ENTRYPOINT:-docker-entrypoint.sh}
GOSU=${WALSHIP_GOSU:-gosu}
export PGDATA=${PGDATA:-/var/lib/postgresql/data}

oneline() { printf '%s' "$*" | tr '\n\r\t' '   ' | tr -d '\000-\037'; }
fail() {  # one line (whatever the values quoted in it hold), then stop the start
  printf '%s: ERROR: %s\n' "$me" "$(oneline "$*")" >&2
  exit 2
}
say() { printf '%s: %s\n' "$me" "$(oneline "$*")" >&2; }

# The official entrypoint's rule: a first argument that is a flag means `postgres FLAGS`.
if [ "$#" -eq 0 ] || [ "${1:0:1}" = '-' ]; then
  set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
  exec "$PG_ENTRYPOINT" "$@"
fi
for arg in "$@"; do  # postgres --help, --version, ...: nothing to start, nothing to check
  case "$arg" in -'?'|--help|--describe-config|-V|--version) exec "$PG_ENTRYPOINT" "$@" ;; esac
done

if [ "$(id -u)" = 0 ]; then
  # Run as root (`docker run --user root`): walship restores as the server's user, so that
  # every restored file belongs to it; the official entrypoint does the same for initdb,
  # and (as it would) a data directory owned by someone else is handed to postgres first.
  mkdir -p -- "$PGDATA"
  find "$PGDATA" \! -user postgres -exec chown -h postgres:postgres '{}' +
  chmod 700 -- "$PGDATA"
  exec "$GOSU" postgres "$0" "$@"
fi

# -- this script's settings ------------------------------------------------------------------
timeout=${WALSHIP_ARCHIVE_TIMEOUT:-60}
case "$timeout" in
  ''|*[!0-9]*) fail "WALSHIP_ARCHIVE_TIMEOUT must be a whole number of seconds (0: off), not" \
                    "'${timeout:0:40}'" ;;
esac
[ "${#timeout}" -le 7 ] || fail "WALSHIP_ARCHIVE_TIMEOUT is too large: at most 9999999 seconds"

restore=${WALSHIP_RESTORE:-}
if [ -n "$restore" ] && [ "$restore" != LATEST ] &&
   ! [[ "$restore" =~ ^[0-9]{8}T[0-9]{6}Z(-[1-9][0-9]{0,5})?$ ]]; then
  fail "WALSHIP_RESTORE must be LATEST or a backup's name as walship backup-list shows it" \
       "(like 20261125T020000Z), not '${restore:0:40}'"
fi
standby=off
case "${WALSHIP_RESTORE_STANDBY:-off}" in
  on|true|yes|1) standby=on ;;
  off|false|no|0) standby=off ;;
  *) fail "WALSHIP_RESTORE_STANDBY must be on or off, not '${WALSHIP_RESTORE_STANDBY:0:40}'" ;;
esac
action=${WALSHIP_RESTORE_TARGET_ACTION:-promote}
case "$action" in
  promote|pause|shutdown) ;;
  *) fail "WALSHIP_RESTORE_TARGET_ACTION must be promote, pause or shutdown, not" \
          "'${action:0:40}'" ;;
esac
target_time=${WALSHIP_RESTORE_TARGET_TIME:-}
if [ -z "$restore" ] && { [ -n "$target_time" ] || [ "$standby" = on ]; }; then
  fail "WALSHIP_RESTORE_TARGET_TIME and WALSHIP_RESTORE_STANDBY need WALSHIP_RESTORE" \
       "(LATEST or a backup name)"
fi

[ -x "$WALSHIP_BIN" ] || fail "walship is not installed at $WALSHIP_BIN"

# -- walship's settings: configuration errors stop the start -------------------------------
# (one retry, 10 s per request: an unreachable repository must not hold a restart up for long)
set +e
problem=$(WALSHIP_STORAGE_RETRIES=1 WALSHIP_STORAGE_TIMEOUT=10 "$WALSHIP_BIN" check 2>&1 \
          >/dev/null)
status=$?
set -e
problem=$(printf '%s\n' "$problem" | sed -n 's/^walship: check: ERROR: //p' | tail -n 1)
case "$status" in
  0) ;;
  2) fail "${problem:-walship check found the settings unusable}; PostgreSQL not started" ;;
  *) if [ -n "$restore" ]; then
       fail "${problem:-walship check exited $status}; nothing to restore from," \
            "PostgreSQL not started"
     fi
     say "WARNING: ${problem:-walship check exited $status}; starting anyway (PostgreSQL" \
         "keeps its WAL until archiving succeeds)" ;;
esac

# -- restore an empty data directory ----------------------------------------------------------
if [ -n "$restore" ]; then
  if [ -s "$PGDATA/PG_VERSION" ]; then
    say "PGDATA $PGDATA holds a database: WALSHIP_RESTORE=$restore ignored (no restore)"
  elif [ -d "$PGDATA" ] && [ -n "$(ls -A -- "$PGDATA")" ]; then
    fail "PGDATA $PGDATA is not empty and holds no database (no PG_VERSION): refusing to" \
         "restore over it; empty it, or point PGDATA at an empty subdirectory of the volume"
  else
    args=(restore "$PGDATA" --target-action "$action")
    if [ "$restore" != LATEST ]; then
      args+=(--backup "$restore")
    fi
    if [ -n "$target_time" ]; then
      args+=(--target-time "$target_time")
    fi
    if [ "$standby" = on ]; then
      args+=(--standby)
    fi
    say "restoring $restore into $PGDATA (standby: $standby)"
    log=$(mktemp)
    set +e
    # walship's lines go to the container's log as they come, and into $log for the reason
    { "$WALSHIP_BIN" "${args[@]}" 2>&1 1>&3 3>&- | tee "$log" >&2; } 3>&1
    status=$?
    set -e
    problem=$(sed -n 's/^walship: restore[^:]*: ERROR: //p' "$log" | tail -n 1)
    rm -f -- "$log"
    [ "$status" = 0 ] || fail "restore failed: ${problem:-walship restore exited $status};" \
                              "PostgreSQL not started"
  fi
fi

exec "$PG_ENTRYPOINT" "$@"
