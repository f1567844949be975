#!/usr/bin/env bash
# Installs what the side-by-side benchmark (bench/run.py) needs, beside walship and never as one
# of its dependencies: pgBackRest (Debian's package), barman-cloud (barman[azure] from PyPI, in
# its own venv), Azurite, a venv with walship, and a self-signed certificate so that Azurite
# speaks HTTPS with verification left on. Idempotent: a second run reuses what the first made.
#
#   bash bench/setup.sh && /opt/walship-venv/bin/python bench/run.py
#
# Overridable: WALSHIP_VENV (/opt/walship-venv), WALSHIP_BENCH_DIR (/opt/walship-bench),
# WALSHIP_AZURITE_DIR (/opt/walship-azurite), WALSHIP_AZURITE_BIN (skip installing Azurite).
set -euo pipefail
cd "$(dirname "$0")/.."

AZURITE_VERSION=3.35.0                               # same pin as .ci/run
VENV=${WALSHIP_VENV:-/opt/walship-venv}              # walship, runnable by the postgres user
BENCH=${WALSHIP_BENCH_DIR:-/opt/walship-bench}       # peers' venv and the certificate
AZURITE_DIR=${WALSHIP_AZURITE_DIR:-/opt/walship-azurite}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
apt_install() {
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
say() { echo "bench/setup.sh: $*"; }

# PostgreSQL server binaries (initdb, pg_ctl, pgbench, pg_basebackup), time(1), openssl, venv.
if ! command -v pg_config >/dev/null || [ ! -x "$(pg_config --bindir)/initdb" ]; then
  say "installing PostgreSQL"; apt_install postgresql postgresql-contrib
fi
[ -x /usr/bin/time ] || { say "installing time"; apt_install time; }
command -v openssl >/dev/null || { say "installing openssl"; apt_install openssl; }
command -v lscpu >/dev/null || { say "installing util-linux"; apt_install util-linux; }
if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
  say "installing python3-venv"; apt_install python3 python3-venv
fi

# pgBackRest, from Debian.
command -v pgbackrest >/dev/null || { say "installing pgBackRest"; apt_install pgbackrest; }

# barman-cloud, from PyPI, in its own venv (made from Debian's python3 so that the postgres
# user can execute it).
as_root mkdir -p "$BENCH"
as_root chmod 755 "$BENCH"
if [ ! -x "$BENCH/barman/bin/barman-cloud-wal-archive" ] \
   || ! "$BENCH/barman/bin/python" -c 'import azure.storage.blob, zstandard, lz4' 2>/dev/null; then
  say "installing barman[azure] in $BENCH/barman"
  [ -x "$BENCH/barman/bin/python" ] || as_root /usr/bin/python3 -m venv "$BENCH/barman"
  # zstandard: barman-cloud's --zstd needs it and barman[azure] does not pull it in; lz4:
  # barman-cloud-backup --lz4 (its fastest compression; it has no zstd for base backups).
  as_root "$BENCH/barman/bin/pip" install -q --disable-pip-version-check "barman[azure]" zstandard \
    lz4
fi

# walship itself (and azure-storage-blob, which run.py uses to count stored bytes).
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; as_root /usr/bin/python3 -m venv "$VENV"; }
# Always from this tree (like .ci/run), so the numbers are for the code being measured.
as_root "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade .

# Azurite, pinned (or the one WALSHIP_AZURITE_BIN names).
if [ -z "${WALSHIP_AZURITE_BIN:-}" ]; then
  if ! command -v npm >/dev/null; then say "installing Node.js"; apt_install nodejs npm; fi
  if [ "$("$AZURITE_DIR/node_modules/.bin/azurite-blob" --version 2>/dev/null)" != "$AZURITE_VERSION" ]; then
    say "installing Azurite $AZURITE_VERSION"
    as_root mkdir -p "$AZURITE_DIR"
    as_root npm install --prefix "$AZURITE_DIR" --no-audit --no-fund --loglevel=error \
      "azurite@$AZURITE_VERSION" >/dev/null
  fi
fi

# A self-signed certificate for Azurite over HTTPS; the clients trust it explicitly.
if [ ! -s "$BENCH/cert.pem" ] || [ ! -s "$BENCH/key.pem" ] \
   || ! openssl x509 -in "$BENCH/cert.pem" -noout -checkend 86400 >/dev/null 2>&1; then
  say "making a self-signed certificate for 127.0.0.1 in $BENCH"
  as_root openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
    -keyout "$BENCH/key.pem" -out "$BENCH/cert.pem" 2>/dev/null
  as_root chmod 644 "$BENCH/cert.pem" "$BENCH/key.pem"    # a throwaway loopback test key
fi

say "pgbackrest: $(pgbackrest version)"
say "barman-cloud: $("$BENCH/barman/bin/barman-cloud-wal-archive" --version 2>&1)"
say "walship: $("$VENV/bin/walship" --version 2>&1 || echo '?')"
say "ready"
