# PostgreSQL 16 (the official image) with walship: archiving on from the first start, and an
# empty data directory restored from the repository before PostgreSQL starts on it.
# Configured entirely from the environment; see "Run in a container" in README.md.
#
#   docker build -t walship-postgres:16 .
#
# The scripts it runs are plain files in docker/, tested outside a container against a real
# PostgreSQL by tests/packaging/ (the machines that build walship have no container engine).
ARG PG_IMAGE=postgres:16-bookworm

# -- build stage: walship in a venv, with its native launcher compiled by gcc ----------------
FROM ${PG_IMAGE} AS build
# Unpinned on purpose: Debian keeps one version of each package per release, so a pinned
# version vanishes at the next point release and the build breaks; the base image is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN python3 -m venv /opt/walship \
 && /opt/walship/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && /opt/walship/bin/walship --version \
 && /opt/walship/bin/python -c 'import sys; sys.exit(open(sys.argv[1], "rb").read(4) != b"\x7fELF")' \
    /opt/walship/bin/walship

# -- final stage: the official image, python3, the venv; no compiler ---------------------------
FROM ${PG_IMAGE}
# Unpinned on purpose (see above).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/walship /opt/walship
COPY docker/walship-entrypoint.sh /usr/local/bin/walship-entrypoint.sh
COPY docker/initdb-walship.sh /docker-entrypoint-initdb.d/10-walship.sh
ENV PATH=/opt/walship/bin:$PATH \
    WALSHIP_ARCHIVE_TIMEOUT=60
# The official image's postgres user, by number (uid and gid 999 there) so that Kubernetes'
# runAsNonRoot can check it; the official entrypoint runs as it unchanged.
USER 999:999
ENTRYPOINT ["walship-entrypoint.sh"]
STOPSIGNAL SIGINT
EXPOSE 5432
CMD ["postgres"]
