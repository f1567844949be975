"""Settings: command-line flags beat ``WALSHIP_*`` environment variables beat the TOML file.

The file is ``--config FILE``, else ``$WALSHIP_CONFIG``, else ``/etc/walship/walship.toml`` if it
exists. Azure credentials come from the standard ``AZURE_STORAGE_*`` variables or the file's
``[azure]`` table (environment first, field by field). Settings are a frozen value; every value
remembers where it came from, so ``walship check`` can show the effective configuration, with
secrets masked. Nothing here ever prints or raises with a secret in it.
"""

from __future__ import annotations

import math
import re
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from walship.codec import DEFAULT_LEVEL
from walship.errors import ConfigError, UsageError
from walship.spool import DEFAULT_CALL_TIMEOUT, DEFAULT_PREFETCH, DEFAULT_PUSH_AHEAD
from walship.storage import AzureCredentials, StorageOptions, secondary_endpoint

DEFAULT_CONFIG_FILE = "/etc/walship/walship.toml"

# name: (environment variable, type, default)
_OPTIONS: dict[str, tuple[str, type, Any]] = {
    "repo": ("WALSHIP_REPO", str, None),
    "encryption_key_file": ("WALSHIP_ENCRYPTION_KEY_FILE", str, None),
    "compression_level": ("WALSHIP_COMPRESSION_LEVEL", int, DEFAULT_LEVEL),
    "storage_retries": ("WALSHIP_STORAGE_RETRIES", int, 4),
    "storage_timeout": ("WALSHIP_STORAGE_TIMEOUT", float, 30.0),
    "call_timeout": ("WALSHIP_CALL_TIMEOUT", float, DEFAULT_CALL_TIMEOUT),
    "log_level": ("WALSHIP_LOG_LEVEL", str, "info"),
    "push_ahead": ("WALSHIP_PUSH_AHEAD", int, DEFAULT_PUSH_AHEAD),
    "prefetch": ("WALSHIP_PREFETCH", int, DEFAULT_PREFETCH),
    "parallel": ("WALSHIP_PARALLEL", int, 3),
    "cache_max_mb": ("WALSHIP_CACHE_MAX_MB", int, 1024),
    "cache_min_free_mb": ("WALSHIP_CACHE_MIN_FREE_MB", int, None),
    "cache_dir": ("WALSHIP_CACHE_DIR", str, None),
    "azure_transport": ("WALSHIP_AZURE_TRANSPORT", str, "auto"),
    "backup_type": ("WALSHIP_BACKUP_TYPE", str, "full"),
}
_AZURE: dict[str, str] = {
    "connection_string": "AZURE_STORAGE_CONNECTION_STRING",
    "account": "AZURE_STORAGE_ACCOUNT",
    "account_key": "AZURE_STORAGE_KEY",
    "sas_token": "AZURE_STORAGE_SAS_TOKEN",
    "account_url": "AZURE_STORAGE_ACCOUNT_URL",
}
SECRET_FIELDS = frozenset({"connection_string", "account_key", "sas_token"})
PRIMARY_NAME = "primary"
MIRROR_MODES = ("sync", "async", "read")
_MIRROR_KEYS = frozenset({"name", "repo", "mode", "azure"})


@dataclass(frozen=True)
class MirrorSettings:
    """One ``[[mirrors]]`` entry: a further repository holding the same objects as the primary.

    ``mode`` is ``sync`` (a push succeeds only once the mirror holds the object too),
    ``async`` (``walship repo-sync`` copies to it later) or ``read`` (walship never writes it:
    an Azure account's read-only secondary endpoint, kept current by Azure's geo-replication;
    the default for a mirror whose endpoint is one). ``azure`` is the mirror's own
    credentials, None to use the primary's (another container of the same account)."""

    name: str
    repo: str
    mode: str = "async"
    azure: AzureCredentials | None = None


@dataclass(frozen=True)
class Settings:
    """The effective configuration of one walship invocation."""

    repo: str | None = None
    encryption_key_file: str | None = None
    compression_level: int = DEFAULT_LEVEL
    storage_retries: int = 4
    storage_timeout: float = 30.0
    call_timeout: float = DEFAULT_CALL_TIMEOUT  # seconds one wal-push or wal-fetch may take
    log_level: str = "info"
    push_ahead: int = DEFAULT_PUSH_AHEAD
    prefetch: int = DEFAULT_PREFETCH
    parallel: int = 3
    cache_max_mb: int = 1024
    cache_min_free_mb: int | None = None  # None: max_wal_size and two segments (prefetch.py)
    cache_dir: str | None = None  # None: pg_wal/walship/prefetch
    azure_transport: str = "auto"
    backup_type: str = "full"  # backup-push's default --type: full, diff or incr
    azure: AzureCredentials = field(default_factory=AzureCredentials)
    mirrors: tuple[MirrorSettings, ...] = ()  # [[mirrors]] in the config file, in order
    config_file: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # one-line warnings about the configuration, for the command line to print (never raised)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # the file's [drill] table, as written (any type): checked by walship.drill.parse_plan when a
    # drill, check or status reads it, so a drill setting never stops archiving
    drill: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def debug(self) -> bool:
        return self.log_level == "debug"

    def require_repo(self) -> str:
        if not self.repo:
            raise ConfigError("no repository is configured", "neither --repo, WALSHIP_REPO "
                              "nor a config file names one", "set WALSHIP_REPO=file:///path "
                              "or azure://container/prefix")
        return self.repo

    @property
    def read_only_primary(self) -> str | None:
        """The primary's blob endpoint when it is an Azure account's secondary (read-access
        geo-redundant storage: read-only, written by Azure's geo-replication alone), else None.
        walship reads from such a primary (a restore at the secondary's site) and never writes
        it: the storage layer makes it a ``read`` member, as a ``mode = "read"`` mirror."""
        if not (self.repo or "").startswith("azure:"):
            return None
        return secondary_endpoint(self.azure)

    def refuse_read_only_primary(self, action: str) -> None:
        """A :class:`UsageError` (exit 2) when the primary is read-only
        (:attr:`read_only_primary`): for the commands that would write it, before they do
        anything. ``action`` completes "cannot ... repository primary"."""
        endpoint = self.read_only_primary
        if endpoint is None:
            return
        from walship.redact import mask_url

        raise UsageError(f"cannot {action} repository primary", f"its endpoint "
                         f"{mask_url(endpoint)} is an account's secondary, read-only: walship "
                         "never writes it (Azure's geo-replication alone does)",
                         "write through the account's primary endpoint (without -secondary); "
                         "reads (wal-fetch, restore, backup-fetch) work from this one")

    def storage_options(self, deadline: float | None = None) -> StorageOptions:
        """How to reach the storage; ``deadline`` (a :func:`time.monotonic` instant) bounds
        every request, retries included."""
        return StorageOptions(retries=self.storage_retries, timeout=self.storage_timeout,
                              azure=self.azure, azure_transport=self.azure_transport,
                              deadline=deadline)

    def describe(self) -> list[tuple[str, str, str]]:
        """(setting, value with secrets masked, source) for every setting: secret fields are
        ``****``, URLs lose their user-info and query string (:func:`walship.redact.mask_url`)."""
        from walship.redact import mask_url

        rows = []
        for name in _OPTIONS:
            value = getattr(self, name)
            shown = "-" if value is None else str(value)
            rows.append((name, mask_url(shown) if name == "repo" else shown,
                         self.sources.get(name, "default")))
        for name in _AZURE:
            value = getattr(self.azure, name)
            if value is None:
                continue
            shown = "****" if name in SECRET_FIELDS else mask_url(value)
            rows.append((f"azure.{name}", shown, self.sources.get(f"azure.{name}", "")))
        source = f"file {self.config_file}"
        for mirror in self.mirrors:
            rows.append((f"mirrors.{mirror.name}", f"{mask_url(mirror.repo)} ({mirror.mode})",
                         source))
            for name in _AZURE:
                value = getattr(mirror.azure, name, None)
                if value is not None:
                    shown = "****" if name in SECRET_FIELDS else mask_url(value)
                    rows.append((f"mirrors.{mirror.name}.azure.{name}", shown, source))
        return rows

    def mirror_options(self, mirror: MirrorSettings,
                       deadline: float | None = None) -> StorageOptions:
        """How to reach ``mirror``: its own Azure credentials (else the primary's)."""
        return StorageOptions(retries=self.storage_retries, timeout=self.storage_timeout,
                              azure=mirror.azure or self.azure,
                              azure_transport=self.azure_transport, deadline=deadline)


_KINDS = {int: "a whole number", float: "a number", str: "text"}


def _convert(name: str, kind: type, value: Any, source: str) -> Any:
    """``value`` as ``kind``, range-checked. Text (the environment, flags) is parsed; a TOML
    value must already have the right type: ``true`` is no number and ``3.7`` no count, and
    neither is quietly turned into one."""
    wanted = _KINDS[kind]
    if isinstance(value, str):
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid {name} {value!r} in {source}",
                              f"it must be {wanted}") from None
    elif isinstance(value, bool) or not (
            isinstance(value, kind) or kind is float and isinstance(value, int)):
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        example = _OPTIONS[name][2] if name in _OPTIONS else None
        hint = "" if example is None else f"e.g. {name} = " + (
            repr(example) if isinstance(example, str) else str(example))
        raise ConfigError(f"invalid {name} {shown} in {source}", f"it must be {wanted}, not "
                          f"{_toml_kind(value)}", hint)
    else:
        converted = kind(value)
    if kind is float and not math.isfinite(converted):
        raise ConfigError(f"invalid {name} {value!r} in {source}",
                          "it must be a finite number (not nan or inf)")
    if name == "compression_level" and not 1 <= converted <= 22:
        raise ConfigError(f"invalid compression_level {converted} in {source}",
                          "zstd levels run from 1 to 22", f"{DEFAULT_LEVEL} is the default")
    if name == "storage_retries" and not 0 <= converted <= 20:
        raise ConfigError(f"invalid storage_retries {converted} in {source}", "use 0 to 20")
    if name == "storage_timeout" and not 0 < converted <= 3600:
        raise ConfigError(f"invalid storage_timeout {converted} in {source}",
                          "use seconds, more than 0 and at most 3600")
    if name == "call_timeout" and not 1 <= converted <= 3600:
        raise ConfigError(f"invalid call_timeout {converted} in {source}",
                          "use seconds, at least 1 and at most 3600", "30 is the default")
    if name in ("push_ahead", "prefetch") and not 0 <= converted <= 256:
        raise ConfigError(f"invalid {name} {converted} in {source}", "use 0 (off) to 256")
    if name == "parallel" and not 1 <= converted <= 64:
        raise ConfigError(f"invalid parallel {converted} in {source}", "use 1 to 64")
    if name == "cache_max_mb" and not 16 <= converted <= 1 << 20:
        raise ConfigError(f"invalid cache_max_mb {converted} in {source}", "use at least 16")
    if name == "cache_min_free_mb" and not 0 <= converted <= 1 << 30:
        raise ConfigError(f"invalid cache_min_free_mb {converted} in {source}",
                          "use 0 or more MiB", "leave it unset: max_wal_size and two segments")
    if name == "cache_dir" and (not converted.startswith("/") or any(
            ord(c) < 32 for c in converted)):
        raise ConfigError(f"invalid cache_dir in {source}", "it must be an absolute path, "
                          "on one line", "name an existing directory the postgres user owns")
    if name == "azure_transport" and converted not in ("auto", "sdk"):
        raise ConfigError(f"invalid azure_transport {converted!r} in {source}",
                          "it is auto (REST for reads and small puts, the SDK for the rest) "
                          "or sdk (the Azure SDK for everything)", "leave it at auto")
    if name == "backup_type" and converted not in ("full", "diff", "incr"):
        raise ConfigError(f"invalid backup_type {converted!r} in {source}",
                          "it is full, diff (what changed since the newest full backup) or "
                          "incr (since the newest backup)", "full is the default")
    if name == "log_level" and converted not in ("debug", "info", "error"):
        raise ConfigError(f"invalid log_level {converted!r} in {source}",
                          "use debug, info or error")
    return converted


def _toml_kind(value: Any) -> str:
    """What a TOML value is, in the words of an error message."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a fraction" if math.isfinite(value) else f"{value}"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _read_file(path: str, explicit: bool) -> tuple[dict[str, Any], os.stat_result | None]:
    """The file's settings, checked for unknown names, and its status (for the mode check)."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            data = tomllib.load(handle)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist",
                              hint="check --config / WALSHIP_CONFIG") from None
        return {}
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}", os.strerror(error.errno or 0),
                          "check its owner and permissions") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML", str(error)) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML", f"it is not UTF-8 text "
                          f"(byte 0x{error.object[error.start]:02x} at offset {error.start})",
                          "save it as UTF-8") from None
    unknown = set(data) - set(_OPTIONS) - {"azure", "drill", "mirrors"}
    azure = data.get("azure", {})
    if not isinstance(azure, dict):
        raise ConfigError(f"config file {path}: [azure] must be a table")
    unknown |= {f"azure.{k}" for k in set(azure) - set(_AZURE)}
    if unknown:
        raise ConfigError(f"config file {path} has unknown settings: "
                          + ", ".join(sorted(unknown)), hint="see the README's configuration "
                          "reference")
    for name, value in azure.items():
        if not isinstance(value, str):
            raise ConfigError(f"invalid azure.{name} in config file {path}",
                              f"it must be text, not {_toml_kind(value)}",
                              "write it in quotes")
    data["mirrors"] = _read_mirrors(path, data.get("mirrors", []))
    return data, status


_MIRROR_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def _read_mirrors(path: str, entries: Any) -> tuple[MirrorSettings, ...]:
    """The ``[[mirrors]]`` array of tables, every entry checked (names unique, a URL, a mode,
    its own ``[mirrors.azure]`` table with the keys of ``[azure]``)."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"config file {path}: mirrors must be an array of tables",
                          hint='write each as [[mirrors]] with name = "...", repo = "..."')
    mirrors: list[MirrorSettings] = []
    names = {PRIMARY_NAME}
    for number, entry in enumerate(entries, 1):
        where = f"[[mirrors]] number {number} in config file {path}"
        unknown = sorted(set(entry) - _MIRROR_KEYS)
        if unknown:
            raise ConfigError(f"{where} has unknown settings: " + ", ".join(unknown),
                              hint="a mirror has name, repo, mode and an [mirrors.azure] table")
        for key in ("name", "repo", "mode"):
            if key in entry and not isinstance(entry[key], str):
                raise ConfigError(f"invalid {key} in {where}", f"it must be text, not "
                                  f"{_toml_kind(entry[key])}", "write it in quotes")
        name = entry.get("name")
        if not name or not _MIRROR_NAME.match(name) or name in names:
            raise ConfigError(f"invalid mirror name {name!r} in {where}",
                              "it is missing, taken, or not a short lower-case name"
                              if name else "every mirror needs a name",
                              'e.g. name = "westeurope" (not "primary", each name once)')
        names.add(name)
        repo = entry.get("repo")
        if not repo:
            raise ConfigError(f"mirror {name} has no repo in {where}",
                              hint='e.g. repo = "azure://wal/cluster1" or "file:///mnt/wal"')
        mode = entry.get("mode")
        if mode is not None and mode not in MIRROR_MODES:
            raise ConfigError(f"invalid mode {mode!r} of mirror {name} in {where}",
                              "it is sync (a push waits for the mirror), async (walship "
                              "repo-sync copies later) or read (never written: an account's "
                              "secondary endpoint)")
        azure = entry.get("azure")
        credentials = None
        if azure is not None:
            if not isinstance(azure, dict):
                raise ConfigError(f"{where}: [mirrors.azure] must be a table")
            bad = sorted(set(azure) - set(_AZURE))
            if bad:
                raise ConfigError(f"{where} has unknown settings: "
                                  + ", ".join(f"azure.{k}" for k in bad),
                                  hint="[mirrors.azure] takes the keys of [azure]")
            for key, value in azure.items():
                if not isinstance(value, str):
                    raise ConfigError(f"invalid azure.{key} of mirror {name} in {where}",
                                      f"it must be text, not {_toml_kind(value)}",
                                      "write it in quotes")
            credentials = AzureCredentials(**{k: v for k, v in azure.items() if v})
        secondary = secondary_endpoint(credentials) if repo.startswith("azure:") else None
        if secondary is not None and mode not in (None, "read"):
            from walship.redact import mask_url

            raise ConfigError(f"mirror {name} in {where} has mode = {mode!r} but its endpoint "
                              f"{mask_url(secondary)} is an account's secondary",
                              "a secondary endpoint (read-access geo-redundant storage) can "
                              "only be read: Azure replicates the account to it",
                              'write mode = "read" (or leave mode out)')
        mirrors.append(MirrorSettings(name, repo, mode or ("read" if secondary else "async"),
                                      credentials))
    return tuple(mirrors)


def _exposed_secrets(path: str, data: Mapping[str, Any],
                     status: os.stat_result | None) -> tuple[str, ...]:
    """A warning when the file holds a secret that other users can read (not an error: the
    secret is out already, and refusing would stop archiving)."""
    held = sorted(f"azure.{name}" for name, value in data.get("azure", {}).items()
                  if name in SECRET_FIELDS and value)
    held += sorted(f"mirrors.{mirror.name}.azure" for mirror in data.get("mirrors", ())
                   if mirror.azure and any(getattr(mirror.azure, n) for n in SECRET_FIELDS))
    if not held or status is None:
        return ()
    from walship.codec.keys import exposure

    problem = exposure(status)
    if problem is None:
        return ()
    warning = (f"config file {path} holds a secret ({', '.join(held)}) and {problem} (hint: "
               f"chmod 600 {path}; owned by root it may also be 640, shared with its group)")
    return (warning,)


def load_settings(flags: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None,
                  config_file: str | None = None) -> Settings:
    """Resolve every setting from ``flags`` (None = not given), ``environ`` and the file."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    explicit = config_file or environ.get("WALSHIP_CONFIG")
    path = explicit or (DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).exists() else None)
    data, status = _read_file(path, bool(explicit)) if path else ({}, None)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (env, kind, default) in _OPTIONS.items():
        if flags.get(name) is not None:
            value, source = flags[name], f"--{name.replace('_', '-')}"
        elif environ.get(env):
            value, source = environ[env], env
        elif name in data:
            value, source = data[name], f"file {path}"
        else:
            values[name] = default
            continue
        values[name] = _convert(name, kind, value, source)
        sources[name] = source
    azure_file = data.get("azure", {})
    azure: dict[str, str | None] = {}
    for name, env in _AZURE.items():
        if environ.get(env):
            azure[name], sources[f"azure.{name}"] = environ[env], env
        elif azure_file.get(name):
            azure[name], sources[f"azure.{name}"] = azure_file[name], f"file {path}"
    warnings = _exposed_secrets(path, data, status) if path else ()
    return Settings(**values, azure=AzureCredentials(**azure),
                    mirrors=data.get("mirrors", ()), config_file=path,
                    sources=sources, warnings=warnings, drill=data.get("drill", {}))


def setting_names() -> list[str]:
    """Every setting a config file may hold (for the documentation and tests)."""
    return [*_OPTIONS, *(f"azure.{name}" for name in _AZURE)]


def repository_names(settings: Settings) -> list[str]:
    """The names of the configured repositories, the primary first."""
    return [PRIMARY_NAME, *(mirror.name for mirror in settings.mirrors)]


assert {f.name for f in fields(Settings)} >= set(_OPTIONS)
