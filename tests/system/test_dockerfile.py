"""The hospital image's Dockerfile, read without Docker (the stack itself runs in
tests/system/test_docker_stack.py, slow)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_holds_every_product_package_and_no_attacks():
    """The hospital image copies each package the apps import (a package missing
    from it breaks every container at its first import), and not the attacker's side."""
    copied = {line.split()[1].rstrip("/") for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line}
    product = {"common", "models", "synthetic_clinic", "privacy_firewall", "skinfed", "client", "server"}
    assert product <= copied, f"the Dockerfile does not copy {sorted(product - copied)}"
    assert not {"audit", "experiments", "tests", "scripts"} & copied
