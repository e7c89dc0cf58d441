"""The dataset commit protocol: several runs may build one dataset at once (two ``c2f preprocess`` of
the same source, a retried Prefect task beside a slow first try). Each run writes into its own
attempt folder ``{dataset}/_attempt-{run_id}/`` (invisible to ``part-*.parquet`` globs and to
pyarrow's dataset discovery, which skips ``_`` names). To publish, a run takes the dataset's claim
and, holding it, removes whatever a crashed run left at the top, moves its files up, removes its
attempt folder, writes the manifest and releases the claim. A run that then finds the dataset
complete discards its attempt and reuses the dataset. On local disk the claim is an exclusive
``flock`` on the dataset folder and a live attempt folder holds a shared one: the kernel drops both
when a process dies, however it dies, so nothing goes stale and a publisher removes exactly the
attempt folders no live process holds. On object stores the claim is a ``_commit.json`` object
created exclusively (``ifGenerationMatch=0`` on GCS), waited for while its run lives, taken over
when the run is gone (this host, pid gone) or the claim is older than :data:`COMMIT_STALE_S`, and
released only by its own run; attempt folders carry an ``_owner.json``. So a glob over a complete
dataset reads exactly the manifest's rows, and no run deletes files another live run is writing.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import time
from dataclasses import dataclass

import fsspec

from coarse2fine.preprocess import storage
from coarse2fine.preprocess.schema import join, read_manifest, url_to_fs

log = logging.getLogger(__name__)

ATTEMPT_PREFIX = "_attempt-"
OWNER = "_owner.json"
CLAIM = "_commit.json"
COMMIT_STALE_S = 600.0
"""Object stores: a claim older than this is taken over. Publishing moves the shards in one batched
copy and writes one file, seconds, so a claim this old belongs to a run that died publishing."""
COMMIT_POLL_S = 0.5
_HELD: dict[str, int] = {}  # local attempt folder -> the descriptor whose shared flock marks it alive


@dataclass(frozen=True)
class Attempt:
    """One run's private folder inside a dataset (``folder``), where its shards are written."""

    uri: str
    run_id: str

    @property
    def folder(self) -> str:
        return join(self.uri, f"{ATTEMPT_PREFIX}{self.run_id}")


def _holder(run_id: str) -> bytes:
    return json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "time": time.time()}).encode()


def _alive(holder: dict) -> bool:
    """Object stores: False when ``holder`` (an owner or claim record) names a process of this host
    that is gone (a pid reused since reads as alive: a claim then goes stale by age). Local disk
    uses kernel locks instead (:func:`_flock`), which also hold across containers sharing a host
    name but not their process ids."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):  # gone meanwhile, or cut mid-write by a crash
        return None


def _flock(path: str, exclusive: bool, block: bool) -> int | None:
    """A ``flock`` on the folder ``path`` (the kernel drops it when the process dies, however it
    dies): its descriptor, or None when ``block`` is False and another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def begin(uri: str, run_id: str) -> Attempt:
    """Open a run's attempt folder in the dataset at ``uri``: on local disk held by a shared flock
    for as long as the run lives; on object stores marked by ``_owner.json``."""
    attempt = Attempt(uri, run_id)
    fs, path = url_to_fs(attempt.folder)
    fs.makedirs(path, exist_ok=True)
    if storage.is_local(fs):
        _HELD[path] = _flock(path, exclusive=False, block=True)
    storage.write_atomic(fs, posixpath.join(path, OWNER), lambda f: f.write(_holder(run_id)))
    return attempt


def discard(attempt: Attempt) -> None:
    """Remove a run's attempt folder and drop its lock (its run gave up, failed, or published)."""
    fs, folder = url_to_fs(attempt.folder)
    fd = _HELD.pop(folder, None)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    if fd is not None:
        os.close(fd)


def _claim_local(path: str) -> int:
    """The dataset folder's exclusive flock (waits for a run that holds it; a dead run's is gone)."""
    fd = _flock(path, exclusive=True, block=False)
    if fd is None:
        log.info("%s: another run is publishing it; waiting", path)
        fd = _flock(path, exclusive=True, block=True)
    return fd


def _claim_object(uri: str, run_id: str) -> None:
    """The dataset's claim object, created exclusively (``ifGenerationMatch=0`` on GCS): waits for a
    live claimant, takes over a claim of a run that is gone (this host, pid gone) or older than
    :data:`COMMIT_STALE_S`. Two runs taking over the same stale claim at once could both succeed:
    the window is one request, against a claimant that died publishing (documented limit)."""
    fs, path = url_to_fs(uri)
    claim = posixpath.join(path, CLAIM)
    waiting = False
    while True:
        try:
            with fs.open(claim, "xb") as f:
                f.write(_holder(run_id))
            return
        except FileExistsError:
            holder = _read_json(fs, claim)
            if holder is not None and holder.get("run_id") == run_id and holder.get("pid") == os.getpid():
                return  # our own claim: a retried upload whose first try had succeeded
            if holder is None and not fs.exists(claim):
                continue  # released meanwhile
            if holder is None or not _alive(holder) or time.time() - holder["time"] > COMMIT_STALE_S:
                log.warning("%s: taking over the commit claim of a run that is gone: %s", uri, holder)
                fs.rm(claim)
                continue
            if not waiting:
                log.info("%s: run %s (host %s, pid %s) is publishing it; waiting", uri,
                         holder["run_id"], holder["host"], holder["pid"])
                waiting = True
            time.sleep(COMMIT_POLL_S)


def _release_object(uri: str, run_id: str) -> None:
    """Delete the claim object if it is still ours (a run that overran and was taken over must not
    release its successor's)."""
    fs, path = url_to_fs(uri)
    claim = posixpath.join(path, CLAIM)
    holder = _read_json(fs, claim)
    if holder is not None and holder.get("run_id") == run_id:
        fs.rm(claim)


def _move(fs: fsspec.AbstractFileSystem, sources: list[str], targets: list[str]) -> None:
    """Renames on local disk; on object stores one batched copy (gcsfs runs the copies concurrently:
    a dataset of thousands of shards publishes in seconds), then one batched delete."""
    if not sources:
        return
    if storage.is_local(fs):
        for src, dst in zip(sources, targets):
            fs.mv(src, dst)
    else:
        fs.copy(sources, targets)
        fs.rm(sources)


def _publish(attempt: Attempt, manifest: dict) -> dict:
    """Holding the claim: clear what crashed runs left at the top (and an older manifest), move the
    attempt's files up, remove the attempt folder, then write the manifest (so a run killed after
    its manifest leaves nothing behind but possibly its claim object)."""
    fs, path = url_to_fs(attempt.uri)
    _, folder = url_to_fs(attempt.folder)
    fs.invalidate_cache(path)
    for p in fs.ls(path, detail=False):
        name = posixpath.basename(p.rstrip("/"))
        if name != CLAIM and not name.startswith(ATTEMPT_PREFIX):
            fs.rm(p, recursive=True)
    files = [p for p in fs.ls(folder, detail=False) if posixpath.basename(p) != OWNER]
    _move(fs, files, [posixpath.join(path, posixpath.basename(p)) for p in files])
    discard(attempt)
    return storage.write_manifest(attempt.uri, **manifest)


def sweep(uri: str) -> None:
    """Remove the attempt folders of runs that are gone: on local disk those whose flock nobody
    holds, on object stores this host's whose pid is gone (another host's cannot be checked from
    here); and, in a complete dataset, a claim object its publisher left when killed after the
    manifest. Run by every publisher, and when a complete dataset is reused."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    for p in fs.glob(posixpath.join(path, f"{ATTEMPT_PREFIX}*")):
        if storage.is_local(fs):
            fd = _flock(p, exclusive=True, block=False)
            if fd is None:
                continue  # a live run holds it
            os.close(fd)  # (a run that opened the folder meanwhile would find it gone and fail loudly)
        else:
            owner = _read_json(fs, posixpath.join(p, OWNER))
            if owner is None or _alive(owner):
                continue
        fs.rm(p, recursive=True)
        log.info("%s: removed the attempt folder of a run that is gone (%s)", uri, posixpath.basename(p))
    claim = posixpath.join(path, CLAIM)
    if not storage.is_local(fs) and read_manifest(uri) is not None and fs.exists(claim):
        holder = _read_json(fs, claim)
        if holder is None or not _alive(holder) or time.time() - holder["time"] > COMMIT_STALE_S:
            fs.rm(claim)


def commit(parts: list[tuple[Attempt, dict]]) -> bool:
    """Publish each ``(attempt, manifest fields)`` in order (:func:`storage.write_manifest`'s keywords); the
    last part's manifest marks the whole as complete. False when another run completed that last
    dataset first: every attempt is discarded and the caller reuses what is there. Claims are
    taken marker first, so two runs never wait on each other."""
    held: list[tuple[str, object]] = []  # (uri, flock descriptor on local disk / None for a claim object)
    try:
        for i, (attempt, _) in enumerate(reversed(parts)):
            fs, path = url_to_fs(attempt.uri)
            if storage.is_local(fs):
                held.append((attempt.uri, _claim_local(path)))
            else:
                _claim_object(attempt.uri, attempt.run_id)
                held.append((attempt.uri, None))
            fs.invalidate_cache(path)
            if i == 0 and read_manifest(attempt.uri) is not None:
                for a, _ in parts:
                    discard(a)
                return False
        for attempt, manifest in parts:
            _publish(attempt, manifest)
            sweep(attempt.uri)
    finally:
        run_id = parts[0][0].run_id
        for uri, fd in held:
            if fd is not None:
                os.close(fd)  # drops the flock
            else:
                _release_object(uri, run_id)
    return True
