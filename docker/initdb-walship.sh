#!/usr/bin/env bash
# initdb-walship.sh: turns on WAL archiving through walship in a brand-new cluster.
#
# The official postgres image runs /docker-entrypoint-initdb.d/*.sh once, after initdb, while
# a temporary server listens on its Unix socket only (libpq's PG* environment, POSTGRES_USER);
# it is installed there as 10-walship.sh. With ALTER SYSTEM (PostgreSQL quotes the values into
# postgresql.auto.conf: no text from the environment is written into the configuration by
# hand) it sets
#   archive_mode = on                   (takes effect when the real server starts next)
#   archive_command = '<walship> wal-push %p'
#   archive_timeout = $WALSHIP_ARCHIVE_TIMEOUT seconds (default 60: the longest a committed
#                     transaction waits to reach the repository, i.e. the RPO)
# and wal_level stays replica (the default). The server runs archive_command with its own
# environment, so walship finds the repository and key there (WALSHIP_REPO, AZURE_*,
# WALSHIP_ENCRYPTION_KEY_FILE). A restored cluster never comes here: it keeps the settings of
# the cluster it was backed up from.
#
# For tests outside a container: WALSHIP_BIN (default /opt/walship/bin/walship).
set -Eeuo pipefail

me=initdb-walship
walship=${WALSHIP_BIN:-/opt/walship/bin/walship}
timeout=${WALSHIP_ARCHIVE_TIMEOUT:-60}

fail() {
  printf '%s: ERROR: %s\n' "$me" "$*" >&2
  exit 2
}

case "$timeout" in
  ''|*[!0-9]*) fail "WALSHIP_ARCHIVE_TIMEOUT must be a whole number of seconds (0: off), not" \
                    "'${timeout:0:40}'" ;;
esac
[ "${#timeout}" -le 7 ] || fail "WALSHIP_ARCHIVE_TIMEOUT is too large: at most 9999999 seconds"
# archive_command is run by /bin/sh: the path goes in unquoted, so only plain path characters.
case "$walship" in
  /*) ;;
  *) fail "WALSHIP_BIN must be an absolute path, not '${walship:0:80}'" ;;
esac
case "$walship" in
  *[!A-Za-z0-9_./+-]*) fail "WALSHIP_BIN may hold only letters, digits and _ . / + -:" \
                             "'${walship:0:80}'" ;;
esac
[ -x "$walship" ] || fail "walship is not installed at $walship"

psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password -q --username "${POSTGRES_USER:-postgres}" \
  --dbname postgres -v "command=$walship wal-push %p" -v "timeout=$timeout" <<'EOSQL'
ALTER SYSTEM SET archive_mode = 'on';
ALTER SYSTEM SET archive_command = :'command';
ALTER SYSTEM SET archive_timeout = :'timeout';
EOSQL
printf '%s: archiving through %s wal-push (archive_timeout %s s) from the next start\n' \
  "$me" "$walship" "$timeout"
