"""The de-identification report (privacy_firewall.report): one typed format,
read back through its loader, decided by codes and fields, never by text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from privacy_firewall.report import (
    DeidentificationReport,
    PhotoRecord,
    ReferenceKind,
    RefusalCode,
    ReportError,
    Status,
    load_report,
    save_report,
)


def _report() -> DeidentificationReport:
    rows = [
        ("a1", PhotoRecord(Status.OK, new_erythema_layout=True, statistics={"mask_fraction": 0.1})),
        ("b2", PhotoRecord(Status.OK, statistics={"mask_fraction": 0.2})),
        # The reason text says one thing, the code another: the code decides.
        ("c3", PhotoRecord(Status.FAILED, RefusalCode.OUT_OF_DISTRIBUTION, "still identifiable (it says)")),
        ("d4", PhotoRecord(Status.FAILED, RefusalCode.STILL_IDENTIFIABLE, "matcher distance 0.1 < 0.4")),
        ("e5", PhotoRecord(Status.FAILED, RefusalCode.STILL_IDENTIFIABLE, "matcher distance 0.2 < 0.4")),
        # A second file of a1's pixels: counted as a file, a1 keeps its record.
        ("a1", PhotoRecord(Status.DUPLICATE, RefusalCode.DUPLICATE, "same pixels as id a1")),
    ]
    return DeidentificationReport.from_rows(rows, theta=7.5, theta_source="calibrated",
                                  reference_kinds=(ReferenceKind.DRAWN_ERYTHEMA_MAP, ReferenceKind.GROUND_TRUTH),
                                  cohort_statistics={"wall_seconds": 1.5}, config={"batch_size": 8})


def test_a_report_reads_back_as_it_was_written(tmp_path):
    save_report(tmp_path, _report())
    back = load_report(tmp_path)
    assert back == _report()
    assert (back.images, back.ok, back.failed, back.duplicates) == (6, 2, 3, 1)
    assert back.ok_ids == ["a1", "b2"] and back.photos["a1"].status is Status.OK and len(back.photos) == 5
    assert back.refused(RefusalCode.STILL_IDENTIFIABLE) == 2 and back.refused(RefusalCode.OUT_OF_DISTRIBUTION) == 1
    assert back.new_erythema_layout and back.reference == "drawn erythema map + ground truth"


def test_the_file_carries_counts_and_codes_for_any_reader(tmp_path):
    save_report(tmp_path, _report())
    raw = json.loads((tmp_path / "report.json").read_text())
    assert (raw["cohort"]["ok"], raw["cohort"]["failed"], raw["cohort"]["duplicates"]) == (2, 3, 1)
    assert raw["cohort"]["refused"] == {"duplicate": 1, "out_of_distribution": 1, "still_identifiable": 2}
    assert raw["cohort"]["reference_kinds"] == ["drawn_erythema_map", "ground_truth"]
    assert raw["images"]["c3"]["code"] == "out_of_distribution" and raw["images"]["a1"]["code"] is None
    assert raw["images"]["c3"]["reason"] == "still identifiable (it says)"
    assert raw["images"]["a1"]["mask_fraction"] == 0.1


def test_no_new_layout_when_only_failed_photos_were_drawn_from_a_map():
    rows = [("a", PhotoRecord(Status.OK)), ("b", PhotoRecord(Status.FAILED, RefusalCode.EDIT_FAILED, new_erythema_layout=True))]
    assert not DeidentificationReport.from_rows(rows, theta=6.0, theta_source="default").new_erythema_layout


@pytest.mark.parametrize(("status", "code"), [(Status.OK, RefusalCode.EDIT_FAILED), (Status.FAILED, None),
                                              (Status.DUPLICATE, None)])
def test_a_code_goes_with_every_status_but_ok(status, code):
    with pytest.raises(ReportError, match="ok photos have no code"):
        PhotoRecord(status, code)


def test_published_copy_keeps_statuses_and_codes_only():
    published = _report().published()
    assert all(p.reason == "" and p.statistics == {} for p in published.photos.values())
    assert published.refused(RefusalCode.STILL_IDENTIFIABLE) == 2 and published.new_erythema_layout
    assert published.config == {} and published.theta == 7.5


def test_missing_damaged_or_foreign_reports_say_what_to_do(tmp_path):
    with pytest.raises(ReportError, match=r"no report.json\): run the firewall"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"cohort": {"ima')
    with pytest.raises(ReportError, match="cannot be read"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"cohort": {"theta": 1}, "images": {"x": {"status": "ok"}}}))
    with pytest.raises(ReportError, match="run the firewall again"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps(
        {"cohort": {"theta": 1, "theta_source": "default", "reference_kinds": []},
         "images": {"x": {"status": "refused-ish", "code": None}}}))
    with pytest.raises(ReportError, match="not a de-identification report"):
        load_report(tmp_path)


def test_deidentify_writes_codes_that_name_why(tiny_embedded_dir, tmp_path):
    """Through the firewall: an unreadable file, a duplicate photo and a grey image
    (not a clinic face: the embedded model's out-of-distribution check refuses it)
    are refused with their codes; a clinic face is de-identified."""
    from privacy_firewall.deidentify import deidentify_folder
    from privacy_firewall.settings import load_firewall_settings
    from synthetic_clinic import render_subject

    photos = tmp_path / "photos"
    photos.mkdir()
    face = render_subject(777, 0, 32).pathological
    Image.fromarray(face).save(photos / "face.png")
    Image.fromarray(face).save(photos / "face again.png")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(photos / "grey.png")
    (photos / "notes.png").write_bytes(b"not a png at all")
    settings = load_firewall_settings([f"firewall.backend.model_path={tiny_embedded_dir}", "firewall.flowedit.steps=4",
                                       "firewall.flowedit.n_max=3", "firewall.gate.matcher=none",
                                       "firewall.gate.require_matcher=false", f"paths.home={tmp_path / 'home'}"])
    written = deidentify_folder(photos, tmp_path / "out", settings, progress=False)
    report = load_report(tmp_path / "out")
    assert report == written
    assert (report.images, report.ok, report.failed, report.duplicates) == (4, 1, 2, 1)
    assert report.refusals == {RefusalCode.DUPLICATE: 1, RefusalCode.OUT_OF_DISTRIBUTION: 1, RefusalCode.UNREADABLE: 1}
    assert report.refused(RefusalCode.OUT_OF_DISTRIBUTION) == 1 == report.gate["refused_out_of_distribution"]
