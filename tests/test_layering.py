"""The packages are layered: the firewall is usable on its own (importing it,
library and CLI, loads no Flower), and no package imports one above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_privacy_firewall_imports_no_flower():
    code = (
        "import sys\n"
        "import privacy_firewall.cli, privacy_firewall.deidentify, "
        "privacy_firewall.training_data, privacy_firewall.watch, models.segmentation\n"
        "from privacy_firewall.backends import load_backend\n"
        "assert not [m for m in sys.modules if m == 'audit' or m.startswith('audit.')], 'the firewall imported audit'\n"
        "import audit.cli, audit.evaluate, audit.benchmark\n"
        "privacy_firewall.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith(('flwr.', 'skinfed', 'client', 'server'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


#: What each package must not import: the layers run common -> models and
#: synthetic_clinic -> privacy_firewall -> skinfed -> client / server -> audit ->
#: experiments, and no arrow runs back up. The product (everything below audit)
#: never imports the attacker's side; nothing imports the tests or the scripts.
_ABOVE_THE_APPS = ("audit", "experiments")
FORBIDDEN_IMPORTS = {
    "common": ("models", "synthetic_clinic", "privacy_firewall", "skinfed", "client", "server", "flwr",
               *_ABOVE_THE_APPS),
    "models": ("synthetic_clinic", "privacy_firewall", "skinfed", "client", "server", "flwr", *_ABOVE_THE_APPS),
    "synthetic_clinic": ("models", "privacy_firewall", "skinfed", "client", "server", "flwr", *_ABOVE_THE_APPS),
    "privacy_firewall": ("skinfed", "client", "server", "flwr", *_ABOVE_THE_APPS),
    "skinfed": ("client", "server", *_ABOVE_THE_APPS),
    "client": ("server", *_ABOVE_THE_APPS),
    "server": ("client", *_ABOVE_THE_APPS),
    "audit": ("experiments",),
}


#: Upward arrows still there, each with why (none now: what reads the hospitals'
#: pairs the way the ClientApp loads them lives in experiments/, above the apps).
KNOWN_UPWARDS: set[tuple[str, str]] = set()


def _imported_modules(path: Path) -> list[str]:
    """Every absolute module name ``path`` imports, at any depth of its code."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def test_no_package_imports_upwards():
    for package, forbidden in FORBIDDEN_IMPORTS.items():
        for path in (ROOT / package).rglob("*.py"):
            where = path.relative_to(ROOT)
            for name in _imported_modules(path):
                if any(where.is_relative_to(folder) and name == module for folder, module in KNOWN_UPWARDS):
                    continue
                top = name.split(".")[0]
                assert top not in (*forbidden, "scripts", "tests"), f"{where} imports {name}"


def test_the_layering_check_sees_an_upward_import(tmp_path):
    """The check above finds an upward import wherever it sits (inside a function too)."""
    module = tmp_path / "upwards.py"
    module.write_text("def f():\n    from privacy_firewall.images import write_png\n    import client.app\n")
    assert _imported_modules(module) == ["privacy_firewall.images", "client.app"]


def test_models_and_the_synthetic_clinic_load_no_firewall():
    code = (
        "import sys\n"
        "import models.segmentation, models.flow_unet, synthetic_clinic.clinic, synthetic_clinic.cli, common.config\n"
        "print(sorted(m for m in sys.modules if m.startswith(('privacy_firewall', 'skinfed', 'client', 'server'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
