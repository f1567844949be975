"""Several repositories behind the one storage protocol: a primary and its mirrors.

:class:`MirroredStorage` is a :class:`~walship.storage.base.Storage` over named members, the
primary first. It adds no storage of its own: every operation is the members' own ``put``,
``get``, ``head``, ``list`` and ``delete``.

* ``put`` stores the same stored bytes (produced once, by the caller's codec) into the primary
  and every ``sync`` mirror in parallel: the data is read once and handed to each member
  through a small bounded queue (memory: a few chunks per member, whatever the object's
  size). It returns only when every one of them holds the object durably. A member that
  already holds the key is reported in :class:`MirrorAlreadyExists` (``holders``), after the
  others have been written, so the caller judges the stored content in each holder. ``async``
  mirrors are not written here: ``walship repo-sync`` (:mod:`walship.reposync`) copies to them.
  ``read`` mirrors (an Azure account's read-only secondary endpoint, which Azure's
  geo-replication keeps current) are never written at all: not by ``put``, not by ``delete``.
  A primary that is itself a secondary endpoint is a ``read`` member too (alone, or with
  mirrors): a ``put`` with no member left to write is refused (the commands that write
  refuse it before this, :meth:`walship.config.Settings.refuse_read_only_primary`).
* ``get`` and ``head`` ask the members in order and fall over to the next on an unreachable or
  missing repository, or a missing object. :class:`~walship.errors.NotFound` when every
  member that answered says the object does not exist and one of them is the primary or a
  sync mirror: each of those holds every object a push acknowledged, so its absence there is
  proven even while another repository cannot answer (without this, losing the primary's
  region would abort every recovery at its first probe for a history file that does not
  exist). When only async or read mirrors (which lag) answered, the error of one that could
  not answer is raised (the existing exit rules apply). A fall-over is logged once per process
  and member, loudly, on stderr (a member that could not answer: once per episode, told again
  after it has answered; the prefetch worker hands its lines to the calls, see
  :func:`on_warning`). A member that could not answer is asked last for the next
  :data:`DOWN_SECONDS` (it is still asked when the others fail).
* **Time shares.** With a deadline (a wal-fetch call's ``call_timeout``; for the prefetch
  worker, ``read_seconds`` from the start of each read), a member that is not the last one
  asked gets :data:`SHARE` of the time left (:func:`walship.storage.base.time_share`: its
  requests, retries and back-offs end by then), so that a repository that accepts
  connections and never answers cannot spend the whole call before the next one is asked:
  with two repositories and call_timeout 30, the primary gets 15 s, the mirror the rest. A
  share bounds the request up to the first byte of the object (``get``'s reply), and then each
  read of its body (a per-read bound: a body that stalls fails within half the time left, one
  that flows is not cut). A body that fails or stalls mid-way falls over to the next member
  holding the same stored bytes, which goes on from the byte reached
  (:class:`_FallOverDownload`). Why half: the first repository is the one expected to
  answer, so it gets the larger part; each next one still gets a real chance.
* ``list`` is the union of the reachable members' listings, sorted by key (a key held by
  several members is listed once, as the first of them holds it). Unreachable members are
  skipped, loudly; when none is reachable the first one's error is raised. Members are asked
  in the read order, with the same time shares for their first page; one that could not
  answer lately is not asked again while the primary or a sync mirror answers.
* ``delete`` deletes from every member but the read ones (deletes are idempotent), or only
  from those named in ``delete_only``; a member that fails makes the call fail after the
  others were tried. Since
  ``list`` is the union, retention keeps in every repository what any kept backup needs.

Verification happens above storage (the codec decodes): :func:`read_elsewhere` retries a read
that failed verification on each member in turn, for the archive and backup readers.
"""

from __future__ import annotations

import heapq
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from walship.errors import (AlreadyExists, IntegrityError, NotFound, StorageError, Unavailable,
                            UsageError, WalshipError)
from walship.storage.base import Download, MetadataSource, ObjectInfo, Storage, time_share

if TYPE_CHECKING:
    from walship.archive import Archive
    from walship.config import Settings

DOWN_SECONDS = 60.0  # a member that could not answer is asked last for this long
SHARE = 0.5  # of the time left, for a member that is not the last one asked (see Time shares)
QUEUE_DEPTH = 4  # chunks waiting for each member of a parallel put
_POLL = 0.2  # seconds between looks at a member that may have stopped reading
_END = object()
T = TypeVar("T")

# (errors after which another member is asked: the member could not answer or lacks the object)
FALL_OVER = (NotFound, Unavailable, StorageError)
# the modes of the members every acknowledged push was written to: a "not found" there is proof
COMPLETE = frozenset({"primary", "sync"})
READ_ONLY = "read"  # a member walship never writes (an account's RA-GRS secondary endpoint)
STORED_DIGEST = "walship_sha256"  # the object digest's metadata (walship.codec), over stored bytes


@dataclass(frozen=True)
class Member:
    """One repository of a mirrored set: its name (``primary`` or the mirror's), its storage
    and its mode (``primary``, ``sync``, ``async`` or ``read``)."""

    name: str
    storage: Storage
    mode: str


class MirrorAlreadyExists(AlreadyExists):
    """A put found the key taken in ``holders`` (the storages, in member order); the other
    members written by the same put now hold the new object."""

    def __init__(self, what: str, holders: list[Storage]) -> None:
        super().__init__(what, "", "")
        self.holders = holders


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()
# called with the text of each warning printed (the prefetch worker: it hands its fall-overs
# to the calls that deliver what it fetched, for PostgreSQL's log)
_listener: Callable[[str], None] | None = None


def on_warning(listener: Callable[[str], None] | None) -> None:
    """Have ``listener`` called with the text of every warning :func:`warn_once` prints."""
    global _listener
    _listener = listener


def warn_once(member: str, kind: str, text: str) -> None:
    """Print ``text`` as a WARNING once per process for (member, kind) (for ``unreachable``:
    once per episode, see :meth:`MirroredStorage._answer`)."""
    with _warned_lock:
        if (member, kind) in _warned:
            return
        _warned.add((member, kind))
    print(f"walship: WARNING: {text}", file=sys.stderr, flush=True)
    listener = _listener
    if listener is not None:
        listener(text)


def _answers_again(member: str) -> None:
    """``member`` could not answer lately and has answered now: the episode is over, its next
    fall-over is told again (a long-lived reader, the prefetch worker, sees several)."""
    with _warned_lock:
        _warned.discard((member, "unreachable"))


def _why(error: WalshipError) -> str:
    return error.one_line()


class MirroredStorage:
    """A primary repository and its mirrors as one :class:`Storage` (see the module
    docstring)."""

    def __init__(self, members: list[Member]) -> None:
        if not members or members[0].mode not in ("primary", READ_ONLY):
            raise ValueError("the first member of a mirrored storage is the primary")
        self.members = members
        # ``delete --repo NAME``: delete from these members only (None: from every one);
        # what goes is decided on the union of the members' listings all the same
        self.delete_only: frozenset[str] | None = None
        self._down: dict[str, float] = {}  # member name -> monotonic time it is asked first again
        # the call's deadline (a time.monotonic() instant) that reads share out; without one,
        # read_seconds (if set: the prefetch worker) from the start of each read
        self.deadline: float | None = None
        self.read_seconds: float | None = None
        names = ", ".join(m.name for m in members[1:])
        self.url = f"{members[0].storage.url} (mirrors: {names})" if names else \
            f"{members[0].storage.url} (read-only)"

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)

    # -- writes --------------------------------------------------------------------------------
    def put(self, key: str, data: Iterable[bytes], *,
            metadata: MetadataSource | None = None) -> ObjectInfo:
        targets = [m for m in self.members if m.mode in COMPLETE]
        if not targets:  # (a read-only primary: the commands that write refuse it first)
            raise UsageError(f"cannot store {key}", "repository primary is read-only (an "
                             "account's secondary endpoint) and no sync mirror is configured",
                             "write through the account's primary endpoint")
        if len(targets) == 1:
            try:
                return targets[0].storage.put(key, data, metadata=metadata)
            except AlreadyExists as error:
                raise MirrorAlreadyExists(error.what, [targets[0].storage]) from None
        once = _Once(metadata)
        feeds = [_Feed() for _ in targets]
        results: list[ObjectInfo | BaseException | None] = [None] * len(targets)

        def run(index: int) -> None:
            try:
                results[index] = targets[index].storage.put(
                    key, feeds[index].chunks(), metadata=once if metadata else None)
            except BaseException as error:  # noqa: BLE001 - handed to the caller below
                results[index] = error
            finally:
                feeds[index].stopped.set()

        threads = [threading.Thread(target=run, args=(i,), name=f"walship-put-{m.name}",
                                    daemon=True) for i, m in enumerate(targets)]
        for thread in threads:
            thread.start()
        try:
            for chunk in data:
                for feed in feeds:
                    feed.offer(chunk)
            for feed in feeds:
                feed.offer(_END)
        except BaseException as error:
            for feed in feeds:
                feed.abort(error)  # the members' puts fail: no partial object anywhere
            for thread in threads:
                thread.join()
            raise
        for thread in threads:
            thread.join()
        failures = [(m, r) for m, r in zip(targets, results) if isinstance(r, BaseException)]
        for member, error in failures:
            if not isinstance(error, AlreadyExists):
                if isinstance(error, WalshipError) and len(targets) > 1:
                    error.what = f"repository {member.name}: {error.what}"
                raise error
        if failures:
            raise MirrorAlreadyExists(f"object {key} already exists in "
                                      + ", ".join(m.name for m, _ in failures),
                                      [m.storage for m, _ in failures])
        return results[0]  # type: ignore[return-value]

    def delete(self, key: str) -> None:
        first: BaseException | None = None
        for member in self.members:
            if member.mode == READ_ONLY or (self.delete_only is not None
                                            and member.name not in self.delete_only):
                continue
            try:
                member.storage.delete(key)
            except WalshipError as error:
                error.what = f"repository {member.name}: {error.what}"
                first = first or error
        if first is not None:
            raise first

    # -- reads ---------------------------------------------------------------------------------
    def _order(self) -> list[Member]:
        """The members in order, those that could not answer lately last (so a long-lived
        reader, the prefetch worker, does not wait on a lost region before every read)."""
        now = time.monotonic()
        down = [m for m in self.members if self._down.get(m.name, 0.0) > now]
        return [m for m in self.members if m not in down] + down

    def _deadline(self) -> float | None:
        """The instant this read must end by: the call's deadline, or ``read_seconds`` from
        now (None: no bound but the members' own)."""
        if self.deadline is not None or self.read_seconds is None:
            return self.deadline
        return time.monotonic() + self.read_seconds

    @staticmethod
    def _share(deadline: float | None, last: bool) -> float | None:
        """The instant a member's requests must end by (see Time shares)."""
        if deadline is None or last:
            return None  # (the member's own deadline: the call's, or none)
        now = time.monotonic()
        return now + max(0.0, deadline - now) * SHARE

    def _first(self, key: str, read: Callable[[Storage], T]) -> T:
        return self._answer(key, read)[0]

    def _answer(self, key: str, read: Callable[[Storage], T]
                ) -> tuple[T, Member, list[Member], float | None]:
        """The first answer (see the module docstring), the member that gave it, the members
        not asked yet, in order, and the read's deadline."""
        errors: list[tuple[Member, WalshipError]] = []
        now = time.monotonic()
        deadline = self._deadline()
        order = self._order()
        for index, member in enumerate(order):
            if self._down.get(member.name, 0.0) > now and any(
                    isinstance(e, NotFound) and m.mode in COMPLETE for m, e in errors):
                continue  # absence proven; a member that just could not answer is not waited on
            try:
                with time_share(self._share(deadline, index == len(order) - 1)):
                    result = read(member.storage)
            except FALL_OVER as error:
                if not isinstance(error, NotFound):
                    self._down[member.name] = time.monotonic() + DOWN_SECONDS
                errors.append((member, error))
                continue
            if self._down.pop(member.name, None) is not None:
                _answers_again(member.name)
            for failed, error in errors:
                if isinstance(error, NotFound):
                    warn_once(failed.name, "missing", f"repository {failed.name} lacks "
                              f"{key}: read from repository {member.name} (run walship "
                              "repo-sync)")
                else:
                    warn_once(failed.name, "unreachable", f"repository {failed.name} could "
                              f"not answer ({_why(error)}): reading from repository "
                              f"{member.name}")
            return result, member, order[index + 1:], deadline
        unanswered = [(m, e) for m, e in errors if not isinstance(e, NotFound)]
        complete = [(m, e) for m, e in errors if isinstance(e, NotFound) and m.mode in COMPLETE]
        if unanswered and complete:
            # The primary and every sync mirror hold each file a push acknowledged: the
            # absence in one of them is proven, whoever else could not answer.
            for member, error in unanswered:
                warn_once(member.name, "unreachable", f"repository {member.name} could not "
                          f"answer ({_why(error)}): {key} is absent from repository "
                          f"{complete[0][0].name}, which holds every acknowledged push")
            raise complete[0][1]
        for member, error in unanswered:
            if len(self.members) > 1:
                error.what = f"repository {member.name}: {error.what}"
            raise error  # an async or read mirror lags: its absence proves nothing
        raise errors[0][1]

    def get(self, key: str) -> Download:
        download, member, rest, deadline = self._answer(key, lambda storage: storage.get(key))
        if not rest:
            return download  # (nobody left to fall over to: its own bounds only)
        return _FallOverDownload(self, key, download, member, rest, deadline)

    def head(self, key: str) -> ObjectInfo:
        return self._first(key, lambda storage: storage.head(key))

    def list(self, prefix: str = "", *, limit: int | None = None) -> Iterator[ObjectInfo]:
        found: dict[str, Iterator[ObjectInfo]] = {}
        first_error: WalshipError | None = None
        now = time.monotonic()
        deadline = self._deadline()
        order = self._order()
        for index, member in enumerate(order):
            if self._down.get(member.name, 0.0) > now and any(
                    self.member(name).mode in COMPLETE for name in found):
                warn_once(member.name, "unreachable", f"repository {member.name} could not "
                          "answer lately: listing the others only")
                continue
            stream = iter(member.storage.list(prefix, limit=limit))
            try:
                with time_share(self._share(deadline, index == len(order) - 1)):
                    head = next(stream, None)
            except (Unavailable, StorageError) as error:
                self._down[member.name] = time.monotonic() + DOWN_SECONDS
                warn_once(member.name, "unreachable", f"repository {member.name} could not "
                          f"be listed ({_why(error)}): listing the others only")
                first_error = first_error or error
                continue
            found[member.name] = iter(()) if head is None else _prepend(head, stream)
        if not found and first_error is not None:
            raise first_error
        # (in member order: a key several hold is listed as the first of them holds it)
        return self._union([found[m.name] for m in self.members if m.name in found], limit)

    @staticmethod
    def _union(streams: list[Iterator[ObjectInfo]], limit: int | None) -> Iterator[ObjectInfo]:
        last = None
        count = 0
        for info in heapq.merge(*streams, key=lambda i: i.key):
            if info.key == last:
                continue
            last = info.key
            yield info
            count += 1
            if limit is not None and count >= limit:
                return

    def close(self) -> None:
        for member in self.members:
            member.storage.close()


class _FallOverDownload:
    """The body of an object one member answered for, read within the time shares (see Time
    shares: each read of it, by the member that is not the last one left, ends within
    :data:`SHARE` of the time left), falling over mid-body to the next member that holds the
    same stored bytes (the same size and object digest: every repository stores the bytes a
    push encoded once, and repo-sync copies them as stored), which goes on from the byte
    reached. The codec checks the digest over every byte all the same."""

    def __init__(self, owner: MirroredStorage, key: str, download: Download, serving: Member,
                 rest: list[Member], deadline: float | None) -> None:
        self.info = download.info
        self._owner = owner
        self._key = key
        self._download = download
        self._serving = serving
        self._rest = list(rest)
        self._deadline = deadline
        self._delivered = 0

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                with time_share(self._owner._share(self._deadline, not self._rest)):
                    data = self._download.read(n)
            except FALL_OVER as error:
                self._fall_over(error)  # (raises the error when no member can go on)
                continue
            self._delivered += len(data)
            return data

    def _fall_over(self, error: WalshipError) -> None:
        failed = self._serving
        self._owner._down[failed.name] = time.monotonic() + DOWN_SECONDS
        _close_quietly(self._download)
        digest = self.info.metadata.get(STORED_DIGEST)
        while digest and self._rest:
            member = self._rest.pop(0)
            download: Download | None = None
            try:
                with time_share(self._owner._share(self._deadline, not self._rest)):
                    download = member.storage.get(self._key)
                    if (download.info.size, download.info.metadata.get(STORED_DIGEST)) != (
                            self.info.size, digest):
                        _close_quietly(download)
                        continue  # (other stored bytes: they cannot go on from here)
                    skip = self._delivered
                    while skip:
                        piece = download.read(min(skip, 1 << 20))
                        if not piece:
                            raise Unavailable(f"cannot read {self._key}", "it ended early")
                        skip -= len(piece)
            except FALL_OVER:
                if download is not None:
                    _close_quietly(download)
                continue
            warn_once(failed.name, "unreachable", f"repository {failed.name} could not "
                      f"answer ({_why(error)}) after {self._delivered} of {self.info.size} "
                      f"bytes of {self._key}: reading the rest from repository {member.name}")
            self._download, self._serving = download, member
            return
        raise error

    def close(self) -> None:
        self._download.close()

    def __enter__(self) -> _FallOverDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(download: Download) -> None:
    try:
        download.close()
    except Exception:  # noqa: BLE001 - releasing a failed download must not hide why it failed
        pass


def _prepend(head: ObjectInfo, rest: Iterator[ObjectInfo]) -> Iterator[ObjectInfo]:
    yield head
    yield from rest


class _Once:
    """A metadata source called by several members: computed once, the same for all."""

    def __init__(self, source: MetadataSource | None) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._value: Mapping[str, str] | None = None

    def __call__(self) -> Mapping[str, str]:
        with self._lock:
            if self._value is None:
                self._value = dict(self._source()) if self._source else {}
            return self._value


class _Feed:
    """The chunks of one member's put, through a bounded queue. A member that stopped reading
    (it failed, or found the key taken before reading) is no longer fed."""

    def __init__(self) -> None:
        self.queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.stopped = threading.Event()

    def offer(self, item: object) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def abort(self, error: BaseException) -> None:
        failure = Unavailable("the data of a mirrored put failed", str(error))
        while not self.stopped.is_set():
            try:
                self.queue.put(failure, timeout=_POLL)
                return
            except queue.Full:
                try:
                    self.queue.get_nowait()  # make room: this put is abandoned anyway
                except queue.Empty:
                    pass

    def chunks(self) -> Iterator[bytes]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]


def read_elsewhere(storage: Storage, attempt: Callable[[Storage], T]) -> T:
    """Call ``attempt`` on each member of ``storage`` alone, in order, after a read through
    ``storage`` failed verification (the exception being handled): the first that succeeds
    wins, loudly; when none does, the original error is raised again."""
    original = sys.exc_info()[1]
    assert isinstance(original, IntegrityError)
    for member in getattr(storage, "members", ()):
        try:
            result = attempt(member.storage)
        except (IntegrityError, *FALL_OVER):
            continue
        warn_once(member.name, "verified", f"{original.one_line()}; read a verified copy "
                  f"from repository {member.name} instead")
        return result
    raise original


def open_mirrored(primary: Storage, settings: Settings,
                  deadline: float | None = None) -> MirroredStorage:
    """The primary (already open) and every configured mirror as one storage."""
    from walship.storage import open_storage

    # (a primary that is an account's secondary endpoint is read, never written, as a read
    # mirror is: walship.config.Settings.read_only_primary)
    members = [Member("primary", primary,
                      READ_ONLY if settings.read_only_primary else "primary")]
    for mirror in settings.mirrors:
        members.append(Member(mirror.name, open_storage(
            mirror.repo, settings.mirror_options(mirror, deadline)), mirror.mode))
    storage = MirroredStorage(members)
    storage.deadline = deadline
    return storage


def verified_read(archive: Archive, action: Callable[[Archive], T]) -> T:
    """``action(archive)``; when it fails verification and the archive has mirrors, the whole
    action again on each repository alone, in order (for reads that cannot resume half-way,
    such as a backup-fetch whose files are written as its parts stream: a failed one has
    removed what it wrote). A single repository: exactly ``action(archive)``."""
    try:
        return action(archive)
    except IntegrityError:
        if not hasattr(archive.storage, "members"):
            raise
        from walship.archive import Archive

        return read_elsewhere(archive.storage,
                              lambda storage: action(Archive(storage, archive.codec)))
