"""Block-level deltas of large relation files: block maps, block members, change sources.

**What is stored at block level.** A relation data file (``global/``, ``base/<db>/`` or a
tablespace's database directory; the main fork, ``<relfilenode>`` and its ``.N`` segments; not
the free-space and visibility-map forks, which are small and rewritten as a whole) of at least
:data:`MIN_FILE_SIZE` bytes. Smaller files are stored whole when they change: a delta's
bookkeeping (one tar header per read, the piece in the manifest, a longer restore chain) is not
worth it below 1 MiB (128 blocks), where a changed file costs at most 1 MiB again.

**Block maps.** Every backup (full too) records, for each such file, the digest of each of its
blocks (the server's ``block_size``) as read during the backup: SHA-256 cut to 16 bytes (with
the CPU's SHA instructions, measured 4.5 times faster per 8 KiB block than BLAKE2b; 128 bits
leave no practical chance of two blocks colliding). The maps are stored in an object per part
(``blockmap.NNNNN`` beside ``part.NNNNN``, streamed through the codec, its object digest in
the manifest). Its plaintext: a JSON header line ``{"format":
"walship-blockmap", "version": 1, "block_size": B, "digest": "sha256-128", "part": N}``; per
file, in the order of :func:`order_key` (the order of the files in the parts), a JSON line
``{"path": P, "size": S, "blocks": K}`` then ``K * 16`` digest bytes (block 0 first); a last
line ``{"end": true, "files": F}``. The maps of a backup, read part after part, are one stream
in that order: the next backup reads its parent's maps alongside its own files
(:class:`ParentMaps`), holding only the maps of the parts it is storing.

**Change detection** (read-and-compare, the default): the file is read whole, each block
hashed; a block is unchanged only if its digest equals the parent's digest of the same block
number; blocks past the parent's size are new; a file shorter than the parent's is truncated at
restore (the manifest's size). Never size or time. A *change source* (:data:`ChangeSource`,
e.g. PostgreSQL 17+ WAL summaries) may instead say, per file, which blocks may have changed
(:class:`ChangedBlocks`): only those blocks are read and compared, the other blocks'
digests are copied from the parent's map. The file's own SHA-256 is then unknown. A file
rebuilt from pieces (either way) is known in its manifest entry by ``blocks_sha256`` alone, the
SHA-256 of its block digests (its block map's), which a restore checks on the rebuilt file as it
checks a SHA-256, and which ``backup-verify`` computes from the pieces without the file.

**Block members.** The changed blocks of each 1 MiB read (:data:`CHUNK`, a "super block" of
128 blocks of 8 KiB) are one tar member named ``<path>//<first block of the read>`` (a name no
stored file can have: a manifest path has no empty component), whose content is a 4-byte
big-endian count ``n``, ``n`` 4-byte big-endian block numbers (ascending), then the ``n``
blocks (``block_size`` bytes each; the file's last block may be shorter). When more than half
of a read's blocks changed, all its blocks are stored; when that is so for every read of the
file, the file is stored whole this way (a new base: restore need not read older pieces).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

from walship.archive import Archive
from walship.backup import catalog
from walship.backup.manifest import Manifest, PartEntry
from walship.codec import OBJECT_DIGEST_METADATA
from walship.errors import IntegrityError, NotFound

MIN_FILE_SIZE = 1 << 20
CHUNK = 1 << 20  # one read; its changed blocks make one member
DIGEST_SIZE = 16
DIGEST_NAME = "sha256-128"
MAP_FORMAT = "walship-blockmap"
MAP_VERSION = 1
_RELATION = re.compile(r"^(?:global|base/\d+|pg_tblspc/\d+/PG_[^/]+/\d+)/\d+(?:\.\d+)?$")
_COUNT = struct.Struct(">I")


def is_relation_file(path: str) -> bool:
    """Whether ``path`` (relative to PGDATA) is a relation's main fork or one of its
    segments."""
    return bool(_RELATION.match(path))


def eligible(path: str, size: int) -> bool:
    """Whether a file is stored with a block map (and block deltas)."""
    return size >= MIN_FILE_SIZE and is_relation_file(path)


def order_key(path: str) -> tuple[str, ...]:
    """The order of files in parts and block maps (the scan's: depth first, names sorted)."""
    return tuple(path.split("/"))


def digest(block: bytes | memoryview) -> bytes:
    """The digest of one block in a block map."""
    return hashlib.sha256(block).digest()[:DIGEST_SIZE]


def block_digests(data: bytes, block_size: int) -> bytes:
    """The digests of the blocks of ``data`` (the last one may be short), concatenated."""
    view = memoryview(data)
    sha256 = hashlib.sha256
    return b"".join(sha256(view[start:start + block_size]).digest()[:DIGEST_SIZE]
                    for start in range(0, len(data), block_size))


@dataclass(frozen=True)
class FileMap:
    """The digests of the blocks of ``path`` (``size`` bytes), 16 bytes per block."""

    path: str
    size: int
    digests: bytes

    @property
    def blocks(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def digest(self, block: int) -> bytes:
        return self.digests[block * DIGEST_SIZE:(block + 1) * DIGEST_SIZE]


@dataclass(frozen=True)
class ChangedBlocks:
    """What a change source knows of one file (a relation segment) since the parent backup.

    ``blocks``: the block numbers of the file (0 = its first block) that may have changed;
    every other block below ``limit`` MUST be byte for byte as the parent backup read it.
    ``limit``: None, or a block number from which on every block may have changed (e.g. the
    file was truncated to that many blocks within the range, then perhaps extended again; a
    source that only knows the file's block count at the later end of the range may give that).
    Blocks past the parent's size are always read, whatever the source says."""

    blocks: frozenset[int]
    limit: int | None = None

    def may_differ(self, block: int) -> bool:
        return block in self.blocks or (self.limit is not None and block >= self.limit)


ChangeSource = Callable[[str], "ChangedBlocks | None"]
"""``source(path)``, ``path`` relative to PGDATA as in the manifest (``base/5/16384.1``), asked
once per large relation file of a diff or incr backup that has a parent version of it, during
the backup (from a part's thread: it must be thread-safe), for the range from the parent
backup's start to this backup's: the blocks that may have changed (:class:`ChangedBlocks`), or
None when it does not cover the file (every block is then read and compared). A source that
answers for a file it does not truly cover makes a backup that restores wrong data: the
restore's check of the rebuilt file's digest catches only damage after the backup."""


def encode_map(block_size: int, part: int, maps: Iterable[FileMap]) -> bytes:
    """The plaintext of a part's block map (see the module docstring)."""
    out = [json.dumps({"format": MAP_FORMAT, "version": MAP_VERSION, "block_size": block_size,
                       "digest": DIGEST_NAME, "part": part}).encode() + b"\n"]
    count = 0
    for file_map in maps:
        out.append(json.dumps({"path": file_map.path, "size": file_map.size,
                               "blocks": file_map.blocks}).encode() + b"\n")
        out.append(file_map.digests)
        count += 1
    out.append(json.dumps({"end": True, "files": count}).encode() + b"\n")
    return b"".join(out)


def decode_map(data: bytes, block_size: int) -> Iterator[FileMap]:
    """The file maps of a part's block map; IntegrityError if it is malformed."""
    position = 0

    def line() -> dict[str, object]:
        nonlocal position
        end = data.find(b"\n", position)
        if end < 0:
            raise IntegrityError("a block map ends early", hint="the object is damaged")
        try:
            value = json.loads(data[position:end])
        except ValueError:
            raise IntegrityError("a block map is malformed", hint="the object is damaged") \
                from None
        position = end + 1
        if not isinstance(value, dict):
            raise IntegrityError("a block map is malformed", hint="the object is damaged")
        return value

    header = line()
    if header.get("format") != MAP_FORMAT or header.get("version") != MAP_VERSION \
            or header.get("block_size") != block_size or header.get("digest") != DIGEST_NAME:
        raise IntegrityError("a block map of another format or block size",
                             f"{header!r:.200}", "take a full backup")
    count = 0
    while True:
        record = line()
        if record.get("end"):
            if record.get("files") != count or position != len(data):
                raise IntegrityError("a block map is incomplete", hint="the object is damaged")
            return
        blocks, size, path = record.get("blocks"), record.get("size"), record.get("path")
        if not isinstance(blocks, int) or not isinstance(size, int) or not isinstance(path, str) \
                or blocks != -(-size // block_size):
            raise IntegrityError("a block map is malformed", hint="the object is damaged")
        digests = data[position:position + blocks * DIGEST_SIZE]
        if len(digests) != blocks * DIGEST_SIZE:
            raise IntegrityError("a block map ends early", hint="the object is damaged")
        position += len(digests)
        count += 1
        yield FileMap(path, size, digests)


class ParentMaps:
    """The parent backup's block maps, read part after part as one stream, and handed out file
    by file to the backup being taken, whose requests come in :func:`order_key` order.

    Each map object is read whole (one part's maps: 2 KiB per MiB of its files, 2 MiB for a
    1 GiB segment) and its object digest checked before any of it is used."""

    def __init__(self, archive: Archive, parent: Manifest) -> None:
        self._archive = archive
        self._parent = parent
        self._entries = self._stream()
        self._pending: FileMap | None = None
        self._done = False

    def _stream(self) -> Iterator[FileMap]:
        for part in sorted(self._parent.block_maps, key=lambda p: p.number):
            yield from decode_map(load_map(self._archive, part), self._parent.block_size)

    def take(self, path: str) -> FileMap | None:
        """The parent's map of ``path``, None if the parent has none."""
        key = order_key(path)
        while not self._done:
            if self._pending is None:
                self._pending = next(self._entries, None)
                if self._pending is None:
                    self._done = True
                    return None
            found = order_key(self._pending.path)
            if found < key:
                self._pending = None
                continue
            if found == key:
                taken, self._pending = self._pending, None
                return taken
            return None
        return None


def load_map(archive: Archive, part: PartEntry) -> bytes:
    """The plaintext of the block map ``part`` (a manifest's ``block_maps`` entry), its object
    digest checked against the manifest's."""
    try:
        download = archive.storage.get(part.key)
    except NotFound:
        raise IntegrityError(f"the block map {part.key} is missing", "its manifest lists it",
                             "take a full backup: the next diff or incr needs it") from None
    with download:
        metadata = ({OBJECT_DIGEST_METADATA: part.digest} if part.digest
                    else download.info.metadata)
        data = b"".join(archive.codec.decode(part.key, download, metadata))
    if len(data) != part.size:
        raise IntegrityError(f"the block map {part.key} has {len(data)} bytes",
                             f"the manifest says {part.size}", "take a full backup")
    return data


def check_maps(archive: Archive, manifest: Manifest) -> int:
    """Read and check every block map of ``manifest`` (each file's map has as many digests as
    its manifest size has blocks); return their stored bytes."""
    sizes = {f.path: f.size for f in manifest.files}
    for part in manifest.block_maps:
        for file_map in decode_map(load_map(archive, part), manifest.block_size):
            if sizes.get(file_map.path) != file_map.size:
                raise IntegrityError(f"the block map {part.key} does not match the manifest",
                                     f"{file_map.path!r}: {file_map.size} bytes",
                                     "take a full backup: the next diff or incr needs it")
    return sum(p.stored_size for p in manifest.block_maps)


def check_chain_maps(archive: Archive, manifest: Manifest) -> int:
    """:func:`check_maps` for ``manifest`` and every backup of its chain (its parents'
    manifests read from the repository); return the stored bytes read. A block map damaged or
    missing anywhere in the chain is an IntegrityError: restore and verify refuse it."""
    stored = check_maps(archive, manifest)
    seen = {manifest.name}
    current = manifest
    while current.parent is not None and current.parent not in seen:
        seen.add(current.parent)
        current = catalog.load_manifest(archive, current.parent)
        stored += check_maps(archive, current)
    return stored


def member_name(path: str, first_block: int) -> str:
    return f"{path}//{first_block}"


def split_member(name: str) -> tuple[str, int] | None:
    """``(path, first block)`` of a block member's name, None for any other member."""
    path, sep, first = name.rpartition("//")
    if not sep or not first.isdigit() or not path:
        return None
    return path, int(first)


def encode_blocks(numbers: list[int], first: int, view: memoryview | Sequence[bytes],
                  block_size: int, *, contiguous: bool = True) -> bytes:
    """A block member's content: the blocks ``numbers`` of the read ``view`` starting at block
    ``first`` (``contiguous``), or (not ``contiguous``) ``view`` the list of exactly those
    blocks, in order."""
    head = _COUNT.pack(len(numbers)) + struct.pack(f">{len(numbers)}I", *numbers)
    if not contiguous:
        return b"".join([head, *view])
    return head + b"".join(view[(n - first) * block_size:(n - first + 1) * block_size]
                           for n in numbers)


def decode_blocks(content: bytes, block_size: int, first: int
                  ) -> list[tuple[int, memoryview]]:
    """``(block number, data)`` of a block member; IntegrityError if it is malformed."""
    view = memoryview(content)
    bad = IntegrityError("a block member is malformed", hint="the stored part is damaged")
    if len(view) < 4:
        raise bad
    (count,) = _COUNT.unpack(view[:4])
    start = 4 + 4 * count
    if count == 0 or len(view) < start:
        raise bad
    numbers = struct.unpack(f">{count}I", view[4:start])
    data = len(view) - start
    if not (count - 1) * block_size < data <= count * block_size:
        raise bad
    if numbers[0] < first or any(b <= a for a, b in pairwise(numbers)) \
            or numbers[-1] >= first + CHUNK // block_size:
        raise bad
    out = []
    for index, number in enumerate(numbers):
        offset = start + index * block_size
        out.append((number, view[offset:offset + block_size]))
    return out
