"""LoRA fine-tunes kept on disk under the server's data directory, surviving restarts.

Each fine-tune is a folder `finetunes/<id>/` with `meta.json` and the PEFT files as uploaded.
Writes are atomic (temp file + rename), so a crash never leaves a half-written adapter. An uploaded
asset is staged and checked before it replaces the stored one, so a refused upload changes nothing.

An upload is written to disk as it arrives (`arrival`), in its own folder under `finetunes/.uploads/`, never held
in memory: an adapter may be 300 MB. Only MAX_UPLOADS_IN_FLIGHT may be arriving or installing at once; each holds
up to 300 MB of disk and installs wait their turn, so more would only queue bytes. Beyond that is a 429.

Changing a fine-tune's rank or target modules takes two uploads, and after the first the two files disagree.
Such a file (valid on its own, but of another rank or targeting other modules than the stored other file) is
neither refused nor stored: it waits in `pending/` until the other file that fits it arrives, and the two replace the
stored pair together; until then the fine-tune serves its last complete pair.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ASSET_NAMES = ("adapter_config.json", "adapter_model.safetensors")
PENDING = "pending"  # a fine-tune's subfolder for a file waiting for its pair
MAX_ASSET_BYTES = 300 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024  # a PEFT adapter_config.json is a KB or two; its check parses it whole, in memory
MAX_UPLOADS_IN_FLIGHT = 2
# A fine-tune's description, in characters. Cloudflare's is a line of free text ("Summarizes support tickets"); it is
# stored, kept in memory and answered in every listing, and no token pays for it: 30 descriptions of 9 MB made each
# listing 283 MB and stalled the server for seconds (hunt round 17 A-F2). 4,096 is a long paragraph or two.
MAX_DESCRIPTION = 4096
UPLOAD_RETRY_AFTER_S = 5  # an upload's place is free again once one in flight is stored (seconds, for 300 MB)
ARRIVING = ".uploads"  # the store's folder of uploads still arriving, one subfolder each
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ID_SHAPE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)  # what `create` makes


class FinetuneError(ValueError):
    """A fine-tune request that cannot be honoured; `code` is the API error code."""

    def __init__(self, message: str, code: int = 5006, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.headers = headers or {}


class PairMismatch(Exception):
    """Raised by an upload's `serve` callback: the staged file is valid, but not the pair of the other one."""


# serve(record, folder holding both files, install): load and serve the pair, calling `install()` (which moves the
# files to where they stay, returns that folder) once it is accepted. Raises FinetuneError / PairMismatch / anything.
Serve = Callable[["Finetune", Path, Callable[[], Path]], None]


@dataclass(slots=True)
class Finetune:
    id: str
    name: str
    model: str
    created_at: str
    modified_at: str
    description: str = ""
    public: bool = False  # Cloudflare's flag, kept and listed (`…/finetunes/public`); one server has no other accounts


def _record(meta: Any) -> Finetune:
    """A meta.json's fields as a `Finetune`, each of its declared type, else a TypeError naming it: one edited by hand
    (`created_at` null or an epoch, an `id` number) made sorting or looking up the fine-tunes raise at start, stopping
    the server, and a `public` string counted as true (hunt round 18 B-F2)."""
    if not isinstance(meta, dict):
        raise TypeError(f"it holds a JSON {type(meta).__name__}, not an object")
    record = Finetune(**meta)  # a missing or unknown field: TypeError
    for field in fields(record):
        value = getattr(record, field.name)
        if type(value).__name__ != field.type:  # the annotation's name ("str", "bool": annotations are not evaluated)
            raise TypeError(f"{field.name} is {json.dumps(value)}, not a {field.type}")
    return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_json_object(config: bytes) -> None:
    try:
        value = json.loads(config)
    except ValueError as exc:  # bad JSON or not UTF-8 at all
        raise FinetuneError(f"adapter_config.json is not valid JSON: {exc}", code=5005) from None
    if not isinstance(value, dict):
        raise FinetuneError("adapter_config.json must hold a JSON object", code=5005)


def check_file_name(file_name: str) -> None:
    """An upload's `file_name` names one of the two assets, else a 400 (3039)."""
    if file_name not in ASSET_NAMES:
        raise FinetuneError(f"file_name must be one of {', '.join(ASSET_NAMES)}, not {file_name!r}", code=3039)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same folder tree: no copy of a 300 MB file
    except OSError:
        shutil.copyfile(source, target)


class FinetuneStore:
    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir) / "finetunes"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # `create` reads the index (`_known`) holding it
        self._upload_lock = threading.Lock()
        self._places_lock = threading.Lock()  # taken on the event loop: never held while anything slow runs
        self._in_flight = 0
        self.arrivals = self.root / ARRIVING
        shutil.rmtree(self.arrivals, ignore_errors=True)  # uploads a crash or a stop interrupted
        self.arrivals.mkdir()
        for stale in self.root.glob("*/.staging-*"):  # where older versions staged; the stored files are intact
            shutil.rmtree(stale, ignore_errors=True)
        self._index: _Index | None = None  # read from disk on first use, then kept: see `_known`

    def create(self, model: str, name: str, description: str = "", reserved: Collection[str] = (), public: bool = False) -> Finetune:
        """A new fine-tune. `reserved`: names served otherwise (the server's `--lora` adapters), refused like a taken one.
        Writes (and fsyncs) its meta.json: run it off the event loop."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise FinetuneError("name must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit")
        if name in reserved:
            raise FinetuneError(f"{name!r} is the name of an adapter this server preloads (--lora); choose another name")
        if description and len(description) > MAX_DESCRIPTION:
            raise FinetuneError(f"description is {len(description)} characters; the limit is {MAX_DESCRIPTION}")
        with self._lock:
            index = self._known()
            if name in index.by_name:
                raise FinetuneError(f"a fine-tune named {name!r} already exists")
            # `id_or_name` must name one fine-tune: a name may not be, or later become, another one's id
            if _ID_SHAPE.match(name) or name in index.by_id:
                raise FinetuneError(f"a fine-tune name cannot look like a fine-tune id: {name!r}")
            now = _now()
            record = Finetune(str(uuid.uuid4()), name, model, now, now, description or "", public)
            folder = self.root / record.id
            folder.mkdir()
            _atomic_write(folder / "meta.json", json.dumps(asdict(record)).encode())
            self._index = index.adding(record)
        return record

    def list(self) -> list[Finetune]:
        """Every readable fine-tune, by creation (from memory: no file is read after the first call)."""
        return list(self._known().records)

    def get(self, id_or_name: str) -> Finetune | None:
        """The fine-tune with this id (in any case, as UUIDs are), else the one with this name (ids first: older data
        may hold a name equal to an id)."""
        index = self._known()
        return index.by_id.get(id_or_name.lower()) or index.by_name.get(id_or_name)

    def existing(self, id_or_name: str) -> Finetune:
        """`get`, or the 400 (5005) of an upload to no fine-tune (the route asks before the body arrives)."""
        record = self.get(id_or_name)
        if record is None:
            raise FinetuneError(f"no fine-tune {id_or_name!r}", code=5005)
        return record

    def arrival(self) -> Path:
        """Take a place for an upload → the file to write it to as it arrives, alone in a fresh folder of the data
        directory (the fine-tunes' file system: installing it is a rename). None free: a 429 (3040) with
        `Retry-After`. `upload` or `discard` gives the place back and removes the folder."""
        with self._places_lock:
            if self._in_flight >= MAX_UPLOADS_IN_FLIGHT:
                raise FinetuneError(f"{MAX_UPLOADS_IN_FLIGHT} adapter uploads are in progress, the most this server "
                                    f"takes at once; try again in a few seconds", code=3040, status=429,
                                    headers={"Retry-After": str(UPLOAD_RETRY_AFTER_S)})
            self._in_flight += 1
        try:
            return Path(tempfile.mkdtemp(dir=self.arrivals)) / "upload"
        except BaseException:
            self._give_back_place()
            raise

    def discard(self, arrived: Path) -> None:
        """An upload is over, stored or not: its folder (whatever is left in it) goes, and its place is free."""
        shutil.rmtree(arrived.parent, ignore_errors=True)
        self._give_back_place()

    def _give_back_place(self) -> None:
        with self._places_lock:
            self._in_flight -= 1

    def upload(self, id_or_name: str, file_name: str, arrived: Path, serve: Serve | None = None) -> Finetune:
        """Store one asset from `arrived` (the complete file `arrival` gave; it is moved, never read whole, and the
        upload `discard`ed whatever happens). It is staged in its folder beside the other asset: the pending one
        first, then the stored one. `serve` must accept the pair; it installs the file (the pending partner with
        it) when it does. A file the pair check finds valid but disagreeing with both partners waits in
        `pending/` (see the module's docstring); without any partner it is stored as is. Anything else raised on
        the way leaves the stored fine-tune exactly as it was."""
        try:
            record = self._checked(id_or_name, file_name, arrived)
            with self._upload_lock:  # one upload at a time: each is checked against the other asset as it stays stored
                staged = arrived.parent
                _fsync(arrived)
                os.replace(arrived, staged / file_name)
                self._pair_and_install(record, staged, file_name, serve)
            return record
        finally:
            self.discard(arrived)

    def _checked(self, id_or_name: str, file_name: str, arrived: Path) -> Finetune:
        """The fine-tune an upload is for, once the name and size of the file (and a config's JSON) pass."""
        record = self.existing(id_or_name)
        check_file_name(file_name)
        size, limit = arrived.stat().st_size, MAX_CONFIG_BYTES if file_name == "adapter_config.json" else MAX_ASSET_BYTES
        if size > limit:
            raise FinetuneError(f"{file_name} is {size} bytes; the limit is {limit}", code=3006, status=413)
        if file_name == "adapter_config.json":
            _check_json_object(arrived.read_bytes())  # alone it cannot be loaded; the loader checks the rest with the pair
        return record

    def _pair_and_install(self, record: Finetune, staged: Path, file_name: str, serve: Serve | None) -> None:
        folder = self.folder(record)
        other = next(name for name in ASSET_NAMES if name != file_name)
        partners = [p for p in (folder / PENDING / other, folder / other) if p.exists()]
        if serve is None or not partners:
            self._install(record, staged, file_name)
            return
        for partner in partners:
            (staged / other).unlink(missing_ok=True)
            _link_or_copy(partner, staged / other)
            use_pending = partner.parent.name == PENDING
            try:
                serve(record, staged, lambda: self._install(record, staged, file_name, with_pending=use_pending))
                return
            except PairMismatch:
                continue  # valid, but not of this partner's pair (rank, target modules)
        (folder / PENDING).mkdir(exist_ok=True)
        os.replace(staged / file_name, folder / PENDING / file_name)

    def _install(self, record: Finetune, staged: Path, file_name: str, with_pending: bool = False) -> Path:
        """The staged file replaces the stored one (the pending partner with it, when the pair was made with it);
        anything pending is then stale. → the fine-tune's folder."""
        folder = self.folder(record)
        with self._lock:
            if with_pending:
                # Two renames, not atomic together: a crash between them leaves a pair of two ranks, which the next start
                # does not load (its reason is logged and answered to requests; uploading the files again mends it).
                other = next(name for name in ASSET_NAMES if name != file_name)
                os.replace(folder / PENDING / other, folder / other)
            os.replace(staged / file_name, folder / file_name)
            shutil.rmtree(folder / PENDING, ignore_errors=True)
            modified_at = _now()
            _atomic_write(folder / "meta.json", json.dumps({**asdict(record), "modified_at": modified_at}).encode())
            record.modified_at = modified_at  # the record `get` answers (the one kept in memory), once the file says so
        return folder

    def folder(self, record: Finetune) -> Path:
        return self.root / record.id

    def missing_assets(self, record: Finetune) -> list[str]:
        return [name for name in ASSET_NAMES if not (self.folder(record) / name).exists()]

    def pending_assets(self, record: Finetune) -> list[str]:
        """Uploaded files waiting for the other file of their pair (not served yet)."""
        return [name for name in ASSET_NAMES if (self.folder(record) / PENDING / name).exists()]

    def damaged(self) -> list[tuple[Path, str]]:
        """(folder, why) of each fine-tune whose meta.json cannot be read (a disk error, a hand edit): every listing
        skips it, not fatal, and the server says so once at start, so an operator knows that data was set aside."""
        return list(self._known().damaged)

    def _known(self) -> _Index:
        """The fine-tunes, read from disk once (the server reads them at start) and kept up to date by `create` and
        `_install`, the only writers while the server runs (a folder is removed with the server stopped). Reading
        every meta.json on each list, get and create, on the event loop, stalled every request for seconds once they
        were large (hunt round 17 A-F2). Readers take the current index without the lock: a writer replaces it whole."""
        index = self._index
        if index is None:
            with self._lock:
                if self._index is None:
                    self._index = _Index.read(self.root)
                index = self._index
        return index


@dataclass(frozen=True, slots=True)
class _Index:
    """The fine-tunes as read: by creation, by id and by name (the first created of a name, should older data hold
    two), and the folders set aside. Never changed: `adding` makes the next one."""

    records: tuple[Finetune, ...]
    by_id: dict[str, Finetune]
    by_name: dict[str, Finetune]
    damaged: tuple[tuple[Path, str], ...] = ()

    @classmethod
    def read(cls, root: Path) -> _Index:
        records, damaged = [], []
        for meta in root.glob("*/meta.json"):
            try:
                records.append(_record(json.loads(meta.read_text())))
            except (OSError, ValueError, TypeError) as exc:  # a foreign or damaged folder is skipped, not fatal
                damaged.append((meta.parent, f"its meta.json is unreadable ({type(exc).__name__}: {exc})"))
        return cls.of(sorted(records, key=lambda f: f.created_at), tuple(damaged))

    @classmethod
    def of(cls, records: list[Finetune], damaged: tuple[tuple[Path, str], ...]) -> _Index:
        by_name: dict[str, Finetune] = {}
        for record in records:
            by_name.setdefault(record.name, record)
        return cls(tuple(records), {record.id.lower(): record for record in records}, by_name, damaged)

    def adding(self, record: Finetune) -> _Index:
        return _Index.of([*self.records, record], self.damaged)
