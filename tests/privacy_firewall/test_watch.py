"""`privacy-firewall watch`: the firewall as a service that de-identifies
a photo folder, publishes only trainable pairs with a status file, and keeps them
up to date when photos are added."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from privacy_firewall.report import load_report
from privacy_firewall.watch import (
    EMPTY,
    MISSING,
    READY,
    STATUS_FILE,
    FirewallStatus,
    Watcher,
    config_key,
    read_status,
    snapshot_dir,
)


@pytest.fixture
def photos(tmp_path) -> tuple[Path, Path]:
    """A hospital folder with 3 photos (+ metadata.csv), and a 4th photo kept aside."""
    from synthetic_clinic.clinic import generate_clinic

    clinic = generate_clinic(tmp_path / "clinic", 4, seed=0, size=32, progress=False)
    folder = tmp_path / "hospital" / "images"
    folder.mkdir(parents=True)
    images = sorted((clinic / "images").iterdir())
    for p in images[:3]:
        shutil.copyfile(p, folder / p.name)
    return folder.parent, images[3]


def _watcher(tmp_path, settings, backend, photos_dir) -> Watcher:
    from privacy_firewall.firewall import PrivacyFirewall

    return Watcher(photos_dir, tmp_path / "work", tmp_path / "published", settings, config_key(settings),
                   firewall=PrivacyFirewall(settings, backend=backend), progress=False)


def test_watch_publishes_trainable_pairs_and_follows_new_photos(tmp_path, tiny_firewall_settings,
                                                               tiny_embedded_backend, photos):
    from privacy_firewall.training_data import load_deidentified

    cfg = tiny_firewall_settings
    folder, extra = photos
    published = tmp_path / "published"
    assert read_status(published).state == MISSING

    watcher = _watcher(tmp_path, cfg, tiny_embedded_backend, folder)
    status = watcher.scan()
    assert status.state == READY and status.ready and (status.done, status.total, status.ok) == (3, 3, 3)
    assert read_status(published) == status
    first = snapshot_dir(published)
    pairs = load_deidentified(first)
    assert len(pairs) == 3 and pairs[0].surrogate.ndim == 3
    # Only what a trainer needs is published: no manifest, panels, figures or reference masks.
    assert {p.name for p in first.iterdir()} == {"report.json", "surrogates", "masks"}
    report = json.loads((first / "report.json").read_text())
    assert set(report["cohort"]) == {"images", "ok", "failed", "duplicates", "theta", "theta_source", "reference",
                                     "reference_kinds", "refused", "new_erythema_layout"}  # counts, no statistics
    assert all(set(rec) == {"status", "code", "reason", "new_erythema_layout"} and rec["reason"] == ""
               for rec in report["images"].values())
    assert report["config"] == report["calibration"] == report["gate"] == {}
    assert load_report(first).ok == 3
    published_text = (published / STATUS_FILE).read_text() + (first / "report.json").read_text()
    for p in (folder / "images").iterdir():
        assert p.stem not in published_text and str(folder) not in published_text
    assert (tmp_path / "work" / "output" / "manifest.local.csv").is_file()  # stays in the private work folder

    # Nothing changed: no new pass, no new snapshot.
    assert watcher.scan().snapshot == status.snapshot

    # A photo arrives: the next scan de-identifies it and publishes a new snapshot; the old one is kept.
    shutil.copyfile(extra, folder / "images" / extra.name)
    status = watcher.scan()
    assert status.state == READY and (status.done, status.total, status.ok) == (4, 4, 4)
    assert status.snapshot != first.name and first.is_dir()
    assert len(load_deidentified(snapshot_dir(published, status))) == 4
    unchanged = sorted((first / "surrogates").iterdir())[0]
    assert (snapshot_dir(published, status) / "surrogates" / unchanged.name).stat().st_ino == unchanged.stat().st_ino

    # A restarted service keeps serving the published snapshot while it checks.
    again = _watcher(tmp_path, cfg, tiny_embedded_backend, folder)
    assert again.status.snapshot == status.snapshot and again.status.ok == 4
    assert again.scan().snapshot == status.snapshot


def test_watch_waits_for_photos_and_reads_old_status_files(tmp_path, tiny_firewall_settings, tiny_embedded_backend):
    cfg = tiny_firewall_settings
    empty = tmp_path / "empty"
    empty.mkdir()
    status = _watcher(tmp_path, cfg, tiny_embedded_backend, empty).scan()
    assert status.state == EMPTY and not status.trainable and status.progress_line() == "0 of 0 photos done"
    # Unknown keys (a newer writer) are ignored; missing ones take defaults.
    (tmp_path / "published" / STATUS_FILE).write_text(json.dumps({"state": "working", "done": 2, "total": 9, "x": 1}))
    assert read_status(tmp_path / "published") == FirewallStatus("working", done=2, total=9)


def test_watch_command_once(tmp_path, tiny_config, tiny_embedded_dir, photos, capsys, monkeypatch):
    from privacy_firewall import cli
    from tests.conftest import TINY_OVERRIDES

    folder, _ = photos
    # The hospital's one variable for the firewall service and its ClientApp: the
    # firewall takes its part and leaves the federation's to the ClientApp.
    monkeypatch.setenv("SKINFED_OVERRIDES", f"firewall.backend.model_path={tiny_embedded_dir} federation.num_rounds=2")
    firewall_overrides = [o for o in TINY_OVERRIDES if o.startswith("firewall.")]  # the CLI refuses data.*, model.*
    code = cli.main(["watch", "--once", "-q", "--publish", str(tmp_path / "pub"), str(folder), str(tmp_path / "w"),
                     *firewall_overrides])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and last["state"] == READY and last["ok"] == 3
    assert read_status(tmp_path / "pub").snapshot == last["snapshot"]
    assert cli.main(["watch", "--interval", "0", str(folder), str(tmp_path / "w")]) == 2
