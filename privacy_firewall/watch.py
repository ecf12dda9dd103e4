"""`privacy-firewall watch`: the hospital's firewall as a service of its own.

    privacy-firewall watch PHOTOS_DIR WORK_DIR [--publish DIR] [--interval 30] [--once] [key=value ...]

The firewall runs before and outside Flower: it de-identifies the photo folder,
publishes what a trainer may see, and rescans the folder every ``--interval``
seconds, so photos added later are de-identified too (the firewall cache makes
the photos done before free). In docker-compose.yml it is the ``firewall-N``
service: raw photos mounted read-only, no network at all.

Folders::

    WORK_DIR/output/          the full `privacy-firewall deidentify` output: report.json,
                              panels, figures and manifest.local.csv (file names: never share)
    WORK_DIR/watch-state.json what the last pass saw (a hash of the folder listing)
    $paths.firewall_cache     the firewall cache (it holds the patients' photos at working size)

    PUBLISH_DIR/              (default WORK_DIR/published) the only folder a trainer mounts
        status.json           progress, counts and the current snapshot: see FirewallStatus
        snapshot-000007/      report.json (cohort counts, ids and statuses only),
                              surrogates/<id>.png and masks/<id>.png of the ok ids

A snapshot is complete before ``status.json`` names it (built aside and renamed)
and the previous one is kept, so a reader that read ``status.json`` a moment ago
still finds its files. Nothing in PUBLISH_DIR names a file, a path or a patient:
ids are salted HMACs of pixels, counts are counts.

Readers (the ClientApp) use :func:`read_status` and :func:`snapshot_dir`::

    status = read_status("/deidentified")
    if status.snapshot is None:
        raise FirewallNotReady(status)          # "not ready: 40 of 120 photos done"
    pairs = load_deidentified(snapshot_dir("/deidentified", status))
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common.io import atomic_write_json
from privacy_firewall.report import load_report, save_report

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
SNAPSHOT_PREFIX = "snapshot-"
#: Snapshots kept: the current one and the one before it (a reader may still be on it).
KEEP_SNAPSHOTS = 2
#: At most one status.json write per this many seconds while a pass runs.
STATUS_EVERY_SECONDS = 2.0

# The states of the service, in status.json's "state".
STARTING, WORKING, READY, EMPTY, ERROR, MISSING = "starting", "working", "ready", "empty", "error", "missing"


# ----------------------------------------------------------------------------- the status file
@dataclass(frozen=True)
class FirewallStatus:
    """What ``status.json`` says (all numbers, no names or paths).

    ``state``: starting | working (a pass runs: ``done`` of ``total``) | ready (every
    photo of the last scan is done and published) | empty (no photos yet) | error
    (the last pass failed; details in the firewall's log) | missing (no status.json:
    the firewall service never ran). ``ok``, ``failed`` and ``theta`` are those of
    the published snapshot; ``snapshot`` is its folder name inside the published
    folder, None until the first pass finished."""

    state: str
    done: int = 0
    total: int = 0
    ok: int = 0
    failed: int = 0
    theta: float | None = None
    snapshot: str | None = None
    updated: str = ""  # when this status was written (UTC, ISO 8601)
    checked: str = ""  # when the photo folder was last scanned
    message: str = ""

    @property
    def ready(self) -> bool:
        """Every photo of the last scan is de-identified and published."""
        return self.state == READY

    @property
    def trainable(self) -> bool:
        """A snapshot exists (perhaps older than the photos being added now)."""
        return self.snapshot is not None

    def progress_line(self) -> str:
        return f"{self.done} of {self.total} photos done"


class FirewallNotReady(RuntimeError):
    """A trainer was asked for pairs before the firewall published any. ``status``
    holds the counts (the ClientApp sends ``done`` and ``total`` as numbers); the
    text, "not ready: N of M photos done", is for the hospital's own log."""

    def __init__(self, status: FirewallStatus) -> None:
        self.status = status
        super().__init__(f"not ready: {status.progress_line()}")


def read_status(published_dir: str | Path) -> FirewallStatus:
    """The firewall's status from ``published_dir/status.json``; state ``missing``
    when there is none (or it cannot be read)."""
    path = Path(published_dir) / STATUS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return FirewallStatus(MISSING, message="no status.json: the firewall service has not run yet")
    except (OSError, ValueError) as exc:
        return FirewallStatus(MISSING, message=f"status.json cannot be read ({type(exc).__name__})")
    known = {k: raw[k] for k in FirewallStatus.__dataclass_fields__ if k in raw}
    return FirewallStatus(**known)


def snapshot_dir(published_dir: str | Path, status: FirewallStatus | None = None) -> Path | None:
    """The folder of the current snapshot (for ``load_deidentified``), or None."""
    status = status or read_status(published_dir)
    return Path(published_dir) / status.snapshot if status.snapshot else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_status(published_dir: Path, status: FirewallStatus) -> FirewallStatus:
    status = replace(status, updated=_now())
    atomic_write_json(published_dir / STATUS_FILE, asdict(status))
    return status


# ----------------------------------------------------------------------------- the photo folder
def folder_fingerprint(photos_dir: Path) -> str:
    """A hash of what the firewall would read: names, sizes and times of the photos,
    masks and metadata.csv. A photo still being copied changes it again when done."""
    entries = []
    for sub in ("", "images", "masks"):
        folder = photos_dir / sub if sub else photos_dir
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir(), key=lambda p: p.name):
            try:
                st = p.stat()
            except OSError:  # gone while listing: the next scan sees the change
                continue
            if not p.is_dir():
                entries.append((sub, p.name, st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


class CountingFirewall:
    """A PrivacyFirewall that reports each finished batch (progress for status.json)."""

    def __init__(self, inner: Any, on_batch) -> None:
        self.inner = inner
        self.on_batch = on_batch

    def run(self, requests: list, progress: bool = False) -> list:
        results = self.inner.run(requests, progress=progress)
        self.on_batch(len(requests))
        return results

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ----------------------------------------------------------------------------- publishing
def _existing_snapshots(published_dir: Path) -> list[Path]:
    return sorted(p for p in published_dir.glob(f"{SNAPSHOT_PREFIX}*") if p.is_dir())


def publish_snapshot(output_dir: Path, published_dir: Path) -> tuple[str, dict]:
    """Copy the trainable part of a deidentify output (surrogates and masks of ok
    ids, and its report with statuses and codes only: no reasons, no statistics,
    see :meth:`~privacy_firewall.report.DeidentificationReport.published`) into
    a new snapshot folder; returns its name and the cohort counts. Files unchanged
    since the previous snapshot are hard links to it."""
    report = load_report(output_dir)
    ok_ids = report.ok_ids
    previous = _existing_snapshots(published_dir)
    number = int(previous[-1].name[len(SNAPSHOT_PREFIX):]) + 1 if previous else 1
    name = f"{SNAPSHOT_PREFIX}{number:06d}"
    tmp = published_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("surrogates", "masks"):
        (tmp / sub).mkdir(parents=True)
        for i in ok_ids:
            source, target = output_dir / sub / f"{i}.png", tmp / sub / f"{i}.png"
            before = previous[-1] / sub / f"{i}.png" if previous else None
            if before is not None and before.is_file() and filecmp.cmp(source, before, shallow=False):
                os.link(before, target)
            else:
                shutil.copyfile(source, target)
    cohort = {"images": report.images, "ok": report.ok, "failed": report.failed, "duplicates": report.duplicates,
              "theta": report.theta}
    save_report(tmp, report.published())
    os.rename(tmp, published_dir / name)
    return name, cohort


def prune_snapshots(published_dir: Path, keep: int = KEEP_SNAPSHOTS) -> None:
    for old in _existing_snapshots(published_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in published_dir.glob(f".{SNAPSHOT_PREFIX}*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the service
class Watcher:
    """One hospital's firewall service: scan, de-identify what changed, publish."""

    def __init__(self, photos_dir: str | Path, work_dir: str | Path, published_dir: str | Path | None,
                 cfg: Any, config_key: str, firewall: Any = None, progress: bool = True) -> None:
        self.photos_dir = Path(photos_dir)
        self.work_dir = Path(work_dir)
        self.output_dir = self.work_dir / "output"
        self.published_dir = Path(published_dir) if published_dir else self.work_dir / "published"
        self.state_file = self.work_dir / "watch-state.json"
        self.cfg = cfg
        self.config_key = config_key
        self._firewall = firewall
        self.progress = progress
        self.published_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        prune_snapshots(self.published_dir)
        # A restart keeps what was published: a trainer can go on while we check.
        earlier = read_status(self.published_dir)
        snapshot = earlier.snapshot if earlier.snapshot and (self.published_dir / earlier.snapshot).is_dir() else None
        self.status = write_status(self.published_dir, FirewallStatus(
            STARTING, done=earlier.done if snapshot else 0, total=earlier.total if snapshot else 0,
            ok=earlier.ok if snapshot else 0, failed=earlier.failed if snapshot else 0,
            theta=earlier.theta if snapshot else None, snapshot=snapshot, message="checking the photo folder"))

    def firewall(self) -> Any:
        """The firewall, loaded once (model weights) and reused by every pass."""
        if self._firewall is None:
            from privacy_firewall.firewall import PrivacyFirewall

            self._firewall = PrivacyFirewall(self.cfg)
        return self._firewall

    def _saved_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _say(self, text: str) -> None:
        print(f"[firewall {_now()}] {text}", file=sys.stderr, flush=True)

    def scan(self) -> FirewallStatus:
        """One rescan: a pass over the folder if it (or the configuration) changed."""
        from privacy_firewall.deidentify import UsageError, discover

        checked = _now()
        fingerprint = folder_fingerprint(self.photos_dir) if self.photos_dir.is_dir() else ""
        saved = self._saved_state()
        unchanged = (saved.get("fingerprint") == fingerprint and saved.get("config") == self.config_key
                     and self.status.snapshot is not None and self.status.state in (STARTING, READY))
        if unchanged:
            self.status = write_status(self.published_dir, replace(self.status, state=READY, checked=checked,
                                                                   message=""))
            return self.status
        try:
            total = len(discover(self.photos_dir))
        except UsageError as exc:  # no folder or no photos yet: wait for them
            log.info("nothing to de-identify: %s", exc)
            self.status = write_status(self.published_dir, replace(
                self.status, state=EMPTY, done=0, total=0, checked=checked,
                message="no photos in the photo folder yet"))
            return self.status
        self._say(f"de-identifying {total} photos (photos done before come from the cache)")
        self.status = write_status(self.published_dir, replace(self.status, state=WORKING, done=0, total=total,
                                                               checked=checked, message=""))
        last_write = [time.monotonic()]

        def on_batch(n: int) -> None:
            self.status = replace(self.status, done=min(self.status.done + n, total))
            if time.monotonic() - last_write[0] >= STATUS_EVERY_SECONDS:
                self.status = write_status(self.published_dir, self.status)
                last_write[0] = time.monotonic()

        from privacy_firewall.deidentify import deidentify_folder

        started = time.time()
        try:
            report = deidentify_folder(self.photos_dir, self.output_dir, self.cfg,
                                       firewall=CountingFirewall(self.firewall(), on_batch), progress=self.progress)
            name, cohort = publish_snapshot(self.output_dir, self.published_dir)
        except Exception as exc:  # the service goes on: the next scan tries again
            log.exception("the firewall pass failed")
            self._say(f"the pass failed with {type(exc).__name__}; retrying at the next scan")
            self.status = write_status(self.published_dir, replace(
                self.status, state=ERROR, message=f"the last pass failed ({type(exc).__name__}); see the firewall's log"))
            return self.status
        self.status = write_status(self.published_dir, FirewallStatus(
            READY, done=cohort["images"], total=cohort["images"], ok=cohort["ok"], failed=cohort["failed"],
            theta=cohort["theta"], snapshot=name, checked=checked))
        atomic_write_json(self.state_file, {"fingerprint": fingerprint, "config": self.config_key, "snapshot": name})
        prune_snapshots(self.published_dir)
        self._say(f"ready: {cohort['ok']} de-identified, {cohort['failed']} refused or failed, "
                  f"{report.duplicates} duplicates ({time.time() - started:.0f} s); published {name}")
        return self.status

    def run(self, interval: float, once: bool = False) -> FirewallStatus:
        """Scan now and then every ``interval`` seconds (only once with ``once``)."""
        while True:
            status = self.scan()
            if once:
                return status
            time.sleep(interval)


def _stop_on_sigterm() -> None:
    """`docker stop` sends SIGTERM: leave at once (every write is atomic; a killed
    pass resumes from the cache)."""

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)


def config_key(cfg: Any) -> str:
    """A hash of the whole configuration: any change makes the next scan a full pass
    (cheap: unchanged photos come from the firewall cache)."""
    return hashlib.sha256(repr(cfg).encode()).hexdigest()


def watch(photos_dir: str | Path, work_dir: str | Path, cfg: Any, published_dir: str | Path | None = None,
          interval: float = 30.0, once: bool = False, progress: bool = True) -> FirewallStatus:
    """Run the firewall service (see the module docstring); returns the last status."""
    _stop_on_sigterm()
    watcher = Watcher(photos_dir, work_dir, published_dir, cfg, config_key(cfg), progress=progress)
    watcher._say(f"watching the photo folder every {interval:.0f} s; publishing to {watcher.published_dir}")
    try:
        return watcher.run(interval, once=once)
    except (KeyboardInterrupt, SystemExit):
        watcher._say("stopped")
        return watcher.status


__all__ = ["FirewallStatus", "FirewallNotReady", "read_status", "snapshot_dir", "watch", "Watcher", "publish_snapshot", "STATUS_FILE"]
