"""scripts/privacy_frontier.py: the re-identification / Dice table and figure from measured points."""

from __future__ import annotations

import json

import pytest

from scripts import privacy_frontier


def test_table_and_figure_from_points(tmp_path, capsys):
    points = [
        {"name": "a", "dice": 0.8, "reid_top1": {"pixel": 0.02, "replay": 0.05, "matcher": 0.6}, "mask_floor": 0.79,
         "update_linkage_top1": 0.31},
        {"name": "b", "dice": 0.0, "reid_top1": {"pixel": 0.9}},
    ]
    path = tmp_path / "points.json"
    path.write_text(json.dumps(points))
    figure = tmp_path / "frontier.png"
    assert privacy_frontier.main(["--points", str(path), "--figure", str(figure)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "| a | 0.800 | 0.020 | 0.050 | 0.600 | 0.790 | 0.310 |" in out
    assert "| b | 0.000 | 0.900 | – | – | – | – |" in out  # unmeasured cells are dashes, not zeros
    assert json.loads(out[-1]) == {"points": 2, "figure": str(figure)}
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_a_point_without_dice_is_named(tmp_path):
    path = tmp_path / "points.json"
    path.write_text(json.dumps([{"name": "half", "reid_top1": {}}]))
    with pytest.raises(SystemExit, match="'half' lacks dice"):
        privacy_frontier.main(["--points", str(path), "--figure", str(tmp_path / "x.png")])


def test_the_shipped_points_make_the_table_and_figure(tmp_path, capsys):
    """docs/privacy_frontier.json (the frontier in docs/results.md) goes through the script:
    one row per measured configuration, its Dice as measured, and each point
    says where its numbers come from."""
    shipped = privacy_frontier.DOCS / "privacy_frontier.json"
    raw = json.loads(shipped.read_text())
    assert raw and all(isinstance(p.get("source"), str) and p["source"].strip() for p in raw)
    figure = tmp_path / "frontier.png"
    assert privacy_frontier.main(["--points", str(shipped), "--figure", str(figure)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(raw)
    for row, point in zip(rows, raw):
        assert row.startswith(f"| {point['name']} | {point['dice']:.3f} |"), row
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_a_missing_or_broken_points_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match="cannot read the points file .*nope.json"):
        privacy_frontier.main(["--points", str(tmp_path / "nope.json")])
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(SystemExit, match="broken.json is not JSON"):
        privacy_frontier.main(["--points", str(broken)])
