"""The models a server serves, by name, and their reloading while it serves.

``--model-dir DIR`` serves one model, named after its folder; ``--models-dir DIR`` serves
every subfolder that holds a run folder (``manifest.json``), named after the subfolder
(`find_models`). A request names its model in its ``model`` field; without one it gets the
default: ``--default-model``, else the only model, else the subfolder named ``default``.

`ModelRegistry` holds one `ModelSlot` per name. A slot's current version is a `TextService`
on an `Engine` of its own (its own inference thread); every version of a name shares one
session store. Handlers reach the models through `ModelAccess`, which resolves a name (an
unknown one is a 404 that lists the names) and keeps the version it picked in use until the
request, or its stream, ends.

Reloading (`ModelRegistry.check_now`, run every ``reload_interval_seconds``): a run folder's
``manifest.json`` is the trainer's commit point, so a manifest that names other weights,
configuration or vocabulary is a new version (a commit of the training state alone is not).
The new version is loaded, verified and warmed up on a new engine's thread, off the event
loop, then swapped in at once: requests already on the old version finish on it, and its
engine is closed when the last of them ends (or after ``request_timeout_seconds``, the
deadline of any work it holds). A version that fails to load is refused with one log line
naming the file, counted (``wordrnn_model_reload_failures_total``) and not tried again until
the manifest changes; the old version keeps serving. A new subfolder is loaded and served
the same way (a training run, once it has committed its first weights). A removed subfolder
keeps being served from memory until the server restarts, so that a name requests use never
disappears under them.

A subfolder whose manifest cannot be read (not a run manifest, nested too deeply to parse, in
a folder that cannot be opened) cannot be told from a stray folder, so it holds back no other
model: at start-up it is refused as a new model that fails to load is (one line naming the
file) and the others are served, whereas a checkpoint that fails verification stops the
start-up. While serving, each model's check stands alone: a bad manifest in one folder never
keeps another model's new version out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from app.engine import Engine
from app.errors import StartupError, UnknownModel
from app.serving import TextService
from app.sessions import SessionStore
from app.settings import Settings
from model_store.checkpoint import MANIFEST_FILE, is_run_dir, read_manifest

log = logging.getLogger("app")

T = TypeVar("T")
E = TypeVar("E")

DEFAULT_NAME = "default"
# The manifest entries a server loads; a commit that changes none of them is not a new version.
SERVED_ROLES = ("config", "vocab", "weights")
# A weights id (``Checkpoint.model_id``): the model's name, then 12 hex digits of its sha256.
_MODEL_ID = re.compile(r"(?P<name>.+)-[0-9a-f]{12}")

# Opens the session store of the model ``name``; ``default`` says whether it is the default.
OpenSessions = Callable[[str, bool], Awaitable[SessionStore]]


# -- finding the models -------------------------------------------------------------------------


def model_name(run_dir: Path) -> str:
    return run_dir.name or run_dir.resolve().name


def run_folders(models_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """The subfolders of ``models_dir`` that are models, by name, and those whose manifest
    cannot be read (loading them says why, in one line naming the file); OSError when the
    folder itself cannot be listed. Hidden folders are left out, and so are training runs
    that have not committed weights yet: they become models with their first weights."""
    models: dict[str, Path] = {}
    unreadable: dict[str, Path] = {}
    for entry in sorted(models_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            if is_run_dir(entry) and read_manifest(entry).get("weights") is not None:
                models[entry.name] = entry
        except Exception:  # CheckpointError, or anything else: this folder alone is unreadable
            unreadable[entry.name] = entry
    return models, unreadable


def find_models(settings: Settings) -> tuple[dict[str, Path], dict[str, Path]]:
    """The models to serve at start-up, by name, and the subfolders whose manifest cannot
    be read (`run_folders`); StartupError when there are no models."""
    if settings.model_dir is not None:
        return {model_name(settings.model_dir): settings.model_dir}, {}
    models_dir = settings.models_dir
    assert models_dir is not None, "the settings require model_dir or models_dir"
    try:
        found, unreadable = run_folders(models_dir)
    except OSError as exc:
        raise StartupError(
            f"{models_dir}: cannot list the models folder ({exc.strerror})"
        ) from None
    if not found:
        problem = f"holds no run folder (a subfolder with {MANIFEST_FILE})"
        if unreadable:
            named = ", ".join(str(run_dir / MANIFEST_FILE) for run_dir in unreadable.values())
            problem += f"; cannot read {named}"
        raise StartupError(f"{models_dir}: {problem}")
    return found, unreadable


def pick_default(names: Sequence[str], wanted: str | None, where: Path) -> str:
    """The default model: ``wanted``, else the only one, else the one named ``default``."""
    listed = ", ".join(repr(name) for name in names)
    if wanted is not None:
        if wanted not in names:
            raise StartupError(f"{where}: no model {wanted!r} to be the default (found {listed})")
        return wanted
    if len(names) == 1:
        return names[0]
    if DEFAULT_NAME in names:
        return DEFAULT_NAME
    raise StartupError(
        f"{where}: several models ({listed}) and no default; pass --default-model NAME "
        f"(WORDRNN_DEFAULT_MODEL) or name one subfolder {DEFAULT_NAME!r}"
    )


def _read_manifest(run_dir: Path) -> bytes | None:
    try:
        return (run_dir / MANIFEST_FILE).read_bytes()
    except OSError:
        return None


def _sha(data: bytes | None) -> str:
    return hashlib.sha256(data).hexdigest() if data is not None else ""


def _served_files(manifest: Mapping[str, Any]) -> tuple[tuple[object, object], ...]:
    """The files a manifest names for the server, with their records (sha256 and size)."""
    files = manifest.get("files")
    files = files if isinstance(files, dict) else {}
    named = [manifest.get(role) for role in SERVED_ROLES]
    return tuple((name, files.get(name) if isinstance(name, str) else None) for name in named)


def _parse(data: bytes) -> dict[str, Any]:
    """A manifest's JSON; an empty one when it is not readable (loading it will say why)."""
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deeply
        return {}
    return manifest if isinstance(manifest, dict) else {}


# -- the models and their versions ----------------------------------------------------------------


class ModelVersion:
    """One loaded version of a model, and the requests using it."""

    def __init__(self, service: TextService) -> None:
        self.service = service
        self.users = 0
        self._unused = asyncio.Event()
        self._unused.set()

    def acquire(self) -> TextService:
        self.users += 1
        self._unused.clear()
        return self.service

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._unused.set()

    @contextlib.contextmanager
    def using(self) -> Iterator[TextService]:
        service = self.acquire()
        try:
            yield service
        finally:
            self.release()

    async def wait_unused(self, timeout: float) -> bool:
        """Whether the last request left within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._unused.wait(), timeout)
        except TimeoutError:
            return False
        return True


class ModelSlot:
    """A served name: its run folder, its current version, and the session store that every
    version of it shares (a session outlives a reload; `TextService` checks its shapes)."""

    def __init__(
        self, name: str, run_dir: Path, sessions: SessionStore, version: ModelVersion, seen: str
    ) -> None:
        self.name = name
        self.run_dir = run_dir
        self.sessions = sessions
        self.version = version
        self.seen = seen  # the sha256 of the manifest last dealt with
        self.refused = ""  # the sha256 of a manifest whose version failed to load

    @property
    def service(self) -> TextService:
        return self.version.service


@dataclass(frozen=True)
class Change:
    """What one check did to one model: loaded a new one, reloaded it, or refused a version
    (``detail``: the new weights id, or why it was refused)."""

    name: str
    outcome: Literal["added", "reloaded", "refused"]
    detail: str


class ModelRegistry:
    """Every served model by name, the default, and the reloading (see the module's doc)."""

    def __init__(
        self,
        settings: Settings,
        open_sessions: OpenSessions,
    ) -> None:
        self.settings = settings
        self.default_name = ""
        self.reloads: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._open_sessions = open_sessions
        self._slots: dict[str, ModelSlot] = {}
        self._refused_new: dict[str, str] = {}  # name -> sha256 of a manifest that failed
        self._lock = asyncio.Lock()  # one check (or the close) at a time
        self._retiring: dict[asyncio.Task[None], ModelVersion] = {}
        self._watcher: asyncio.Task[None] | None = None

    # -- start and stop -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model, then watch for new checkpoints (with a reload interval).

        Raises StartupError (one line naming the file or the setting) when a model cannot be
        served, after closing whatever was started. A subfolder whose manifest cannot be read
        is refused as a new model would be (one line naming the file), the others served.
        """
        found, unreadable = find_models(self.settings)
        where = self.settings.models_dir or self.settings.model_dir
        assert where is not None
        self.default_name = pick_default(list(found), self.settings.default_model, where)
        try:
            for name, run_dir in found.items():
                raw = await asyncio.to_thread(_read_manifest, run_dir)
                await self._add(name, run_dir, _sha(raw))
            for name, run_dir in unreadable.items():  # refused in one line, not served
                raw = await asyncio.to_thread(_read_manifest, run_dir)
                await self._add_new(name, run_dir, raw)
        except BaseException:
            await self.close()
            raise
        interval = self.settings.reload_interval_seconds
        if interval > 0:
            self._watcher = asyncio.create_task(self._watch(interval))

    async def close(self) -> None:
        """Stop watching, close every engine (each drains what it holds) and session store."""
        async with self._lock:  # after a check in progress, so that no engine is left behind
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
            retiring = list(self._retiring.values())
            for task in list(self._retiring):
                task.cancel()
            await asyncio.gather(*self._retiring, return_exceptions=True)
            versions = [*retiring, *(slot.version for slot in self._slots.values())]
            await asyncio.gather(*(v.service.engine.close() for v in versions))
            for slot in self._slots.values():
                await slot.sessions.close()
            self._slots.clear()

    # -- choosing a model ---------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return sorted(self._slots)

    @property
    def slots(self) -> list[ModelSlot]:
        return [self._slots[name] for name in self.names]

    @property
    def default(self) -> ModelSlot:
        return self._slots[self.default_name]

    def get(self, model: str | None = None) -> ModelSlot:
        """The model a request names: by name, or by a weights id (the current version's or
        an earlier one's, both meaning the model's current version); the default for None.
        """
        if model is None:
            return self.default
        slot = self._slots.get(model)
        if slot is None and (match := _MODEL_ID.fullmatch(model)):
            slot = self._slots.get(match["name"])
        if slot is None:
            raise UnknownModel(model, self.names)
        return slot

    def card_id(self, service: TextService) -> str:
        """The id of a model in ``/v1/models``: its weights id when one run folder is served
        (as before several models could be), its name with a models folder."""
        return service.model_id if self.settings.model_dir is not None else service.name

    # -- reloading ----------------------------------------------------------------------------

    async def check_now(self) -> list[Change]:
        """Look once for new checkpoints and new models; load, swap in or refuse them."""
        async with self._lock:
            run_dirs = {name: slot.run_dir for name, slot in self._slots.items()}
            manifests, new = await asyncio.to_thread(self._scan, run_dirs)
            changes = []
            for name, raw in manifests.items():
                if raw is not None and (change := await self._update(self._slots[name], raw)):
                    changes.append(change)
            for name, (run_dir, raw) in new.items():
                if (change := await self._add_new(name, run_dir, raw)) is not None:
                    changes.append(change)
            return changes

    def _scan(
        self, run_dirs: Mapping[str, Path]
    ) -> tuple[dict[str, bytes | None], dict[str, tuple[Path, bytes]]]:
        """On a worker thread: each served model's manifest (None while it is missing), and
        the run folders of the models folder that are not served yet, with theirs."""
        manifests = {name: _read_manifest(run_dir) for name, run_dir in run_dirs.items()}
        new: dict[str, tuple[Path, bytes]] = {}
        if self.settings.models_dir is not None:
            try:
                found, unreadable = run_folders(self.settings.models_dir)
            except OSError as exc:
                log.warning("cannot list the models folder (%s); serving what is loaded", exc)
                found, unreadable = {}, {}
            for name, run_dir in {**found, **unreadable}.items():  # loading refuses the latter
                if name not in run_dirs and (raw := _read_manifest(run_dir)) is not None:
                    new[name] = (run_dir, raw)
        return manifests, new

    async def _update(self, slot: ModelSlot, raw: bytes) -> Change | None:
        sha = _sha(raw)
        if sha in (slot.seen, slot.refused):
            return None
        loaded = slot.service.engine.checkpoint.manifest
        if _served_files(_parse(raw)) == _served_files(loaded):
            slot.seen = sha  # a commit of the training state alone: nothing to reload
            return None
        try:
            service = await self._load(slot.name, slot.run_dir, slot.sessions)
        except Exception as exc:
            if await self._changed_meanwhile(slot.run_dir, sha):
                return None
            slot.refused = sha
            return self._refused(slot.name, exc, f"still serving {slot.service.model_id}")
        slot.seen = sha
        old = slot.version
        slot.version = ModelVersion(service)
        self.reloads[slot.name] += 1
        log.info(
            "model %r: now serving %s (was %s)", slot.name, service.model_id, old.service.model_id
        )
        self._retire(slot.name, old)
        return Change(slot.name, "reloaded", service.model_id)

    async def _add_new(self, name: str, run_dir: Path, raw: bytes | None) -> Change | None:
        sha = _sha(raw)
        if self._refused_new.get(name) == sha:
            return None
        try:
            slot = await self._add(name, run_dir, sha)
        except Exception as exc:
            if await self._changed_meanwhile(run_dir, sha):
                return None
            self._refused_new[name] = sha
            return self._refused(name, exc, "not served")
        self._refused_new.pop(name, None)
        log.info("model %r: new, serving %s", name, slot.service.model_id)
        return Change(name, "added", slot.service.model_id)

    async def _changed_meanwhile(self, run_dir: Path, sha: str) -> bool:
        """Whether the manifest changed while its version loaded: then the failure may be a
        race with the trainer's next commit, and the next check tries the new manifest."""
        return _sha(await asyncio.to_thread(_read_manifest, run_dir)) != sha

    def _refused(self, name: str, exc: Exception, serving: str) -> Change:
        self.failures[name] += 1
        if isinstance(exc, StartupError):  # one line that names the file at fault
            log.error("model %r: refused a new version: %s (%s)", name, exc, serving)
        else:
            log.error("model %r: refused a new version (%s)", name, serving, exc_info=exc)
        return Change(name, "refused", str(exc).splitlines()[0] if str(exc) else repr(exc))

    def _retire(self, name: str, old: ModelVersion) -> None:
        task = asyncio.create_task(self._close_when_unused(name, old))
        self._retiring[task] = old
        task.add_done_callback(self._retiring.pop)

    async def _close_when_unused(self, name: str, old: ModelVersion) -> None:
        limit = self.settings.request_timeout_seconds
        if not await old.wait_unused(limit):
            log.warning(
                "model %r: %d requests still use %s after %g s; closing it",
                name,
                old.users,
                old.service.model_id,
                limit,
            )
        await old.service.engine.close()
        log.info("model %r: closed %s", name, old.service.model_id)

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)  # the polling interval
            try:
                await self.check_now()
            except Exception:
                log.exception("checking the models for new checkpoints failed")

    # -- loading ------------------------------------------------------------------------------

    async def _add(self, name: str, run_dir: Path, seen: str) -> ModelSlot:
        """Open the session store of a new model, load it, and serve it."""
        sessions = await self._open_sessions(name, name == self.default_name)
        try:
            service = await self._load(name, run_dir, sessions)
        except BaseException:
            await sessions.close()
            raise
        slot = ModelSlot(name, run_dir, sessions, ModelVersion(service), seen)
        self._slots[name] = slot
        return slot

    async def _load(self, name: str, run_dir: Path, sessions: SessionStore) -> TextService:
        """A verified, warmed-up version of ``run_dir`` on a new engine (StartupError when
        the checkpoint is bad)."""
        s = self.settings
        engine = await Engine.start(
            run_dir,
            s.device,
            kind=s.engine,
            max_pending=s.max_pending,
            max_batch=s.max_batch,
            timeout_seconds=s.request_timeout_seconds,
            threads=s.torch_threads,
            quantize=s.quantize,
        )
        return TextService(engine, sessions, s, name=name)


@dataclass(frozen=True)
class ModelAccess:
    """The models as one request sees them: chosen by name, with the caller's key
    fingerprint (``owner``) for the service calls that touch its sessions."""

    registry: ModelRegistry
    owner: str | None = None

    def service(self, model: str | None) -> TextService:
        """The current version of ``model``, for an answer that does not wait (its card)."""
        return self.registry.get(model).service

    async def run(self, model: str | None, work: Callable[[TextService], Awaitable[T]]) -> T:
        """``work`` on the current version of ``model``, kept in use until it returns."""
        with self.registry.get(model).version.using() as service:
            return await work(service)

    async def stream(
        self, model: str | None, start: Callable[[TextService], Awaitable[AsyncIterator[E]]]
    ) -> AsyncIterator[E]:
        """Start a stream on the current version of ``model`` (refusals raise here); the
        version stays in use until the stream ends."""
        version = self.registry.get(model).version
        service = version.acquire()
        try:
            events = await start(service)
        except BaseException:
            version.release()
            raise
        return _released_at_end(events, version.release)


async def _released_at_end(
    events: AsyncIterator[E], release: Callable[[], None]
) -> AsyncIterator[E]:
    try:
        async with aclosing(events) as inner:  # type: ignore[type-var]
            async for event in inner:
                yield event
    finally:
        release()
