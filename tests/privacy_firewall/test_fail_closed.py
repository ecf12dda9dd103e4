"""Every fail-closed rule through the public entry point (`privacy-firewall
deidentify`), with the shipped embedded weights and the shipped gate on, and the
real-photo path (SD3 / FLUX random-weight pipelines, dlib's face recogniser) end
to end.

Clinic faces here come from clinic seed 4242: the embedded model was trained on
seed 12345 and its out-of-distribution threshold calibrated on seed 777
(scripts/train_embedded.py), so these faces are held out from both.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from models.embedded import find_embedded_weights
from privacy_firewall import cli
from privacy_firewall.backends.embedded import OOD_FILE
from privacy_firewall.face_recognition import DLIB_THRESHOLD, FaceRecogniser
from privacy_firewall.gate import IdentityGate
from privacy_firewall.images import load_photo, prepare
from privacy_firewall.report import DeidentificationReport, PhotoRecord, RefusalCode, Status, load_report
from privacy_firewall.settings import load_firewall_settings
from synthetic_clinic import render_subject

torch.set_num_threads(1)

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
HELD_OUT_SEED = 4242  # neither the training (12345) nor the calibration (777) clinic
#: A fixed hospital key: the surrogates (and so the gate's verdicts) are reproducible.
KEY_HEX = "5e" * 32


def write_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path)


def cartoon_face() -> np.ndarray:
    """A drawn smiley: a face to a person, not to a model of clinic photos."""
    img = np.full((256, 256, 3), (90, 160, 230), np.uint8)
    cv2.circle(img, (128, 128), 90, (255, 220, 60), -1)
    for x in (95, 161):
        cv2.circle(img, (x, 105), 12, (0, 0, 0), -1)
    cv2.ellipse(img, (128, 150), (45, 25), 0, 0, 180, (120, 0, 0), 6)
    return img


def not_clinic_photos() -> dict[str, np.ndarray]:
    """Real photos (public domain, bundled with matplotlib and scikit-image) and
    awkward images, none of them a synthetic-clinic face."""
    import skimage.data  # in the test extra: these photos ship inside the wheel

    return {
        "grace_hopper": load_photo(GRACE_HOPPER),
        "astronaut": skimage.data.astronaut(),
        "coffee": skimage.data.coffee(),
        "camera": skimage.data.camera(),  # greyscale, saved as a one-channel PNG
        "chelsea": skimage.data.chelsea(),
        "cartoon": cartoon_face(),
        "grey": np.full((128, 128, 3), 128, np.uint8),
        "white": np.full((128, 128, 3), 255, np.uint8),
        "skin_tone": np.full((96, 128, 3), (220, 170, 140), np.uint8),
        # Under- and over-exposed real photos: easy to denoise, so the exposure decides.
        "dark_coffee": (skimage.data.coffee() * 0.2).astype(np.uint8),
        "washed_out_astronaut": (255 - (255 - skimage.data.astronaut().astype(int)) * 0.1).astype(np.uint8),
    }


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def deidentify(photos: Path, out: Path, home: Path,
               *overrides: str) -> tuple[int, DeidentificationReport, dict[str, PhotoRecord]]:
    """`privacy-firewall deidentify` through its main(); (exit code, report, the
    report's record per source file name)."""
    key = home / "firewall.key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(KEY_HEX + "\n")
    code = cli.main(["deidentify", str(photos), str(out), f"firewall.key_file={key}",
                     f"firewall.cache_dir={home / 'cache'}", *overrides, "-q"])
    report = load_report(out)
    with open(out / "manifest.local.csv", newline="") as f:
        by_file = {Path(row["source"]).name: report.photos[row["id"]] for row in csv.DictReader(f)}
    return code, report, by_file


#: A short edit, for tests of what happens after it (the gate, refusals).
QUICK_EDIT = ("firewall.flowedit.steps=4", "firewall.flowedit.n_max=3", "firewall.original_healthy_twin=false")


def model_copy(tmp: Path, drop: tuple[str, ...] = ()) -> Path:
    """The shipped weights folder, linked file by file, without ``drop``."""
    folder = tmp / "model"
    folder.mkdir()
    for f in find_embedded_weights().iterdir():
        if f.is_file() and f.name not in drop:
            (folder / f.name).symlink_to(f)
    return folder


# ----------------------------------------------------------------------- embedded backend, shipped weights
@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One deidentify run with every default: the corpus of photos that are not
    clinic faces and a held-out clinic face (a 256-px JPEG: another size and
    format than the clinic's 64-px PNGs; more faces in the next test but one)."""
    root = tmp_path_factory.mktemp("shipped")
    photos = root / "photos"
    photos.mkdir()
    for name, rgb in not_clinic_photos().items():
        write_png(photos / f"{name}.png", rgb)
    (photos / "clinic_b.jpg").write_bytes(jpeg(render_subject(HELD_OUT_SEED, 1, 256).pathological))
    code, report, by_file = deidentify(photos, root / "out", root / "home")
    return {"root": root, "photos": photos, "code": code, "report": report, "by_file": by_file}


def test_real_and_flat_photos_are_refused_with_the_backend_to_use(shipped_run: dict[str, Any]) -> None:
    assert shipped_run["report"].config["gate"] == {"matcher": "auto", "require_matcher": True,
                                                    "out_of_distribution_check": True}
    refused = {f: e for f, e in shipped_run["by_file"].items() if not f.startswith("clinic_")}
    assert sorted(refused) == sorted(f"{n}.png" for n in not_clinic_photos())
    for file, entry in refused.items():
        assert (entry.status, entry.code) == (Status.FAILED, RefusalCode.OUT_OF_DISTRIBUTION), file
        assert "not a synthetic-clinic face" in entry.reason, (file, entry.reason)
        assert "backend=sd3" in entry.reason and "backend=flux" in entry.reason, file
    assert shipped_run["report"].refused(RefusalCode.OUT_OF_DISTRIBUTION) == len(refused)
    assert shipped_run["code"] == cli.EXIT_FAILED  # some photo was refused


def test_held_out_clinic_faces_pass_the_check_and_the_shipped_gate(shipped_run: dict[str, Any]) -> None:
    out = shipped_run["root"] / "out"
    clinic = {f: e for f, e in shipped_run["by_file"].items() if f.startswith("clinic_")}
    assert set(clinic) == {"clinic_b.jpg"}
    for file, entry in clinic.items():
        assert entry.status is Status.OK, (file, entry.reason)
        # The shipped matcher measured the surrogate and found it far enough from its source.
        assert entry.statistics["gate_distance"] >= 1.145, file  # identity_matcher.json's threshold
    assert len(list((out / "surrogates").iterdir())) == 1  # only the accepted photo leaves


def test_the_check_holds_for_more_held_out_faces_and_views() -> None:
    """The out-of-distribution check alone on more held-out faces (both views,
    with and without erythema, both worlds) than deidentify could edit in a test."""
    from privacy_firewall.firewall import PrivacyFirewall

    settings = load_firewall_settings(["firewall.key_file=/nonexistent/key", "firewall.cache_dir=/nonexistent"])
    firewall = PrivacyFirewall(settings, use_cache=False)
    faces = []
    for i in range(12):
        subject = render_subject(HELD_OUT_SEED, 10 + i, 64, view="periocular" if i % 3 == 0 else None)
        faces += [subject.pathological, subject.healthy]
    for i in range(12):  # the hospitals' presentations: dusky, annular and perioral erythema
        faces.append(render_subject(HELD_OUT_SEED, 30 + i, 64, world="hospital").pathological)
    reasons = firewall.backend.out_of_distribution([firewall._prepare(f).pixels for f in faces])
    assert reasons == [None] * len(faces)


@pytest.mark.parametrize("damage", ["missing", "not json", "no threshold", "zero threshold"])
def test_a_model_folder_without_a_usable_calibration_refuses_every_photo(
        shipped_run: dict[str, Any], tmp_path: Path, damage: str) -> None:
    """A copy of the shipped folder with its calibration gone or broken refuses
    everything, the clinic faces too, even those a run with the calibration has
    already put in the cache (same key, same cache)."""
    folder = model_copy(tmp_path, drop=(OOD_FILE,))
    broken = {"not json": "{threshold: 0.08", "no threshold": '{"margin": 2.5}', "zero threshold": '{"threshold": 0}'}
    if damage in broken:
        (folder / OOD_FILE).write_text(broken[damage])
    root = shipped_run["root"]
    code, report, by_file = deidentify(shipped_run["photos"], tmp_path / "out", root / "home",
                                       f"firewall.backend.model_path={folder}")
    assert code == cli.EXIT_FAILED
    assert len(by_file) == len(shipped_run["by_file"]) and report.ok == 0
    for file, entry in by_file.items():
        assert entry.status is Status.FAILED, file
        assert str(folder / OOD_FILE) in entry.reason and "refuses every photo" in entry.reason
        assert "copy out_of_distribution.json" in entry.reason  # what to do
    assert not list((tmp_path / "out" / "surrogates").iterdir())


def test_a_model_folder_with_half_an_identity_matcher_refuses(tmp_path: Path) -> None:
    """The matcher's calibration (identity_matcher.json) gone: the gate does not
    fall back to another matcher, it refuses."""
    folder = model_copy(tmp_path, drop=("identity_matcher.json",))
    photos = tmp_path / "photos"
    photos.mkdir()
    write_png(photos / "clinic.png", render_subject(HELD_OUT_SEED, 2, 64).pathological)
    code, report, by_file = deidentify(photos, tmp_path / "out", tmp_path / "home",
                                       f"firewall.backend.model_path={folder}", *QUICK_EDIT)
    (entry,) = by_file.values()
    assert code == cli.EXIT_FAILED and entry.code is RefusalCode.CANNOT_CHECK_IDENTITY
    assert str(folder / "identity_matcher.json") in entry.reason and "is missing" in entry.reason
    assert "restore both identity_matcher files" in entry.reason


@pytest.mark.parametrize("n_max", [0, 1], ids=["the source itself", "a mild edit of it"])
def test_the_shipped_gate_refuses_a_surrogate_that_is_still_its_source(tmp_path: Path, n_max: int) -> None:
    """FlowEdit on the photo itself (no erythema map) with n_max=0 returns the
    source unchanged, with n_max=1 of 4 steps a light edit: the shipped identity
    matcher links both to the patient, and after every identity it refuses."""
    photos = tmp_path / "photos"
    photos.mkdir()
    write_png(photos / "clinic.png", render_subject(HELD_OUT_SEED, 3, 64).pathological)
    code, report, by_file = deidentify(photos, tmp_path / "out", tmp_path / "home", *QUICK_EDIT,
                                       "firewall.identity.use_erythema_map=false", f"firewall.flowedit.n_max={n_max}",
                                       "firewall.identity.attempts=2")
    (entry,) = by_file.values()
    assert code == cli.EXIT_FAILED and entry.code is RefusalCode.STILL_IDENTIFIABLE
    assert "still identifiable" in entry.reason and "after 2 identities" in entry.reason
    assert report.refused(RefusalCode.STILL_IDENTIFIABLE) == 1


def test_the_shipped_matcher_links_a_face_to_itself_and_not_to_others() -> None:
    """The gate with the shipped matcher on held-out people: a source and its
    copy, or its healthy version, are refused; another person is accepted (at a
    claimed 5 % false-match rate, at most 3 of 30 different pairs may be called
    the same: P(X > 3) < 0.07 for X ~ Bin(30, 0.05))."""
    from privacy_firewall.firewall import PrivacyFirewall

    settings = load_firewall_settings(["firewall.key_file=/nonexistent/key", "firewall.cache_dir=/nonexistent"])
    firewall = PrivacyFirewall(settings, use_cache=False)
    assert firewall.gate.matcher.name != "dlib face recogniser"  # the embedded model's own
    subjects = [render_subject(HELD_OUT_SEED, 40 + i, 64) for i in range(30)]
    sources = [s.pathological for s in subjects]
    rng = np.random.default_rng(0)
    near_copies = [np.clip(s.astype(float) * 0.97 + 4 + rng.normal(0, 3, s.shape), 0, 255).astype(np.uint8)
                   for s in sources]
    for candidates in (sources, near_copies, [s.healthy for s in subjects]):
        verdicts = firewall.gate.check(sources, candidates)
        assert not any(v.passed for v in verdicts)
        assert all("still identifiable" in v.reason for v in verdicts)
    others = sources[1:] + sources[:1]
    false_matches = sum(not v.passed for v in firewall.gate.check(sources, others))
    assert false_matches <= 3


# ----------------------------------------------------------------------- the real-photo path: SD3 / FLUX + dlib
REAL_PHOTO_OVERRIDES = ("firewall.backend.dtype=fp32", "firewall.backend.device=cpu",
                        "firewall.backend.working_size=256", "firewall.backend.max_sequence_length=32",
                        "firewall.flowedit.steps=4", "firewall.flowedit.n_max=3")


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight SD3 and FLUX pipelines saved as model folders."""
    from privacy_firewall.backends.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    folders = {}
    for kind, build in (("sd3", build_tiny_sd3_pipeline), ("flux", build_tiny_flux_pipeline)):
        folders[kind] = tmp_path_factory.mktemp(f"tiny-{kind}")
        build().save_pretrained(folders[kind])
    return folders


@pytest.fixture
def portrait(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copyfile(GRACE_HOPPER, photos / "portrait.jpg")
    return photos


def test_dlib_gate_is_installed_and_finds_the_portrait() -> None:
    """The test extra carries dlib and its weights: the gate on real photos is
    dlib, not a skipped test. It finds the portrait's face at the working size."""
    recogniser = FaceRecogniser()
    source = prepare(load_photo(GRACE_HOPPER), 256, 16, False).pixels
    assert recogniser.embed(source) is not None
    assert recogniser.embed(np.full_like(source, 128)) is None


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_random_weight_pipelines_make_noise_the_gate_cannot_check(
        kind: str, tiny_pipelines: dict[str, Path], portrait: Path, tmp_path: Path) -> None:
    """Random weights paint no face: the gate cannot show the surrogate is
    unlinkable, so the portrait is refused and the report says why."""
    code, report, by_file = deidentify(portrait, tmp_path / "out", tmp_path / "home", f"backend={kind}",
                                       f"firewall.backend.model_path={tiny_pipelines[kind]}", *REAL_PHOTO_OVERRIDES)
    (entry,) = by_file.values()
    assert code == cli.EXIT_FAILED and entry.code is RefusalCode.CANNOT_CHECK_IDENTITY
    assert "dlib face recogniser finds no face" in entry.reason and "refused" in entry.reason
    assert not list((tmp_path / "out" / "surrogates").iterdir())


class FixedSurrogate:
    """Wraps a backend so that every decoded image is ``surrogate(source)``: a
    stand-in for a model that paints a chosen face."""

    def __init__(self, backend: Any, surrogate: Any) -> None:
        self._backend, self._surrogate, self._source = backend, surrogate, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self._source = images.detach().clone()
        return self._backend.encode_images(images)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._surrogate(self._source).to(latents.device)


def astronaut_like(source: torch.Tensor) -> torch.Tensor:
    import skimage.data

    h, w = source.shape[-2:]
    other = cv2.resize(skimage.data.astronaut(), (w, h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(other).permute(2, 0, 1)[None].float().div(255).expand_as(source)


def mildly_edited(source: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(0)) * 0.015
    return (source * 0.95 + 0.03 + noise).clamp(0, 1)


@pytest.mark.parametrize(("surrogate", "accepted"), [(astronaut_like, True), (lambda s: s, False), (mildly_edited, False)],
                         ids=["another person", "the source itself", "a mild edit of the source"])
def test_the_dlib_gate_passes_another_person_and_refuses_the_source(
        tiny_pipelines: dict[str, Path], portrait: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        surrogate: Any, accepted: bool) -> None:
    import privacy_firewall.firewall as firewall_module

    real_load = firewall_module.load_backend
    monkeypatch.setattr(firewall_module, "load_backend", lambda s: FixedSurrogate(real_load(s), surrogate))
    code, report, by_file = deidentify(portrait, tmp_path / "out", tmp_path / "home", "backend=sd3",
                                       f"firewall.backend.model_path={tiny_pipelines['sd3']}", *REAL_PHOTO_OVERRIDES,
                                       "firewall.identity.attempts=2")
    (entry,) = by_file.values()
    if accepted:
        assert code == cli.EXIT_OK and entry.status is Status.OK, entry.reason
        assert entry.statistics["gate_distance"] >= DLIB_THRESHOLD
        assert len(list((tmp_path / "out" / "surrogates").iterdir())) == 1
    else:
        assert code == cli.EXIT_FAILED and entry.code is RefusalCode.STILL_IDENTIFIABLE
        assert "still identifiable (dlib face recogniser distance" in entry.reason
        assert "after 2 identities" in entry.reason
        assert not list((tmp_path / "out" / "surrogates").iterdir())


def test_the_installed_command_refuses_a_real_photo(portrait: Path, tmp_path: Path) -> None:
    """`privacy-firewall deidentify` as a hospital runs it (a subprocess, every
    default): the portrait is refused, exit code 1, and the reason is in the report."""
    key = tmp_path / "key"
    key.write_text(KEY_HEX + "\n")
    run = subprocess.run([sys.executable, "-m", "privacy_firewall.cli", "deidentify", str(portrait),
                          str(tmp_path / "out"), f"firewall.key_file={key}", f"firewall.cache_dir={tmp_path / 'c'}", "-q"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 1, run.stderr
    (entry,) = load_report(tmp_path / "out").photos.values()
    assert entry.code is RefusalCode.OUT_OF_DISTRIBUTION and "backend=sd3" in entry.reason


def test_the_gate_without_any_matcher_refuses() -> None:
    """No matcher at all (none installed) and require_matcher on: refused."""
    settings = load_firewall_settings(["firewall.gate.matcher=none"]).gate
    (verdict,) = IdentityGate(settings, None).check([np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8, 3), np.uint8)])
    assert not verdict.passed and "no identity matcher" in verdict.reason


@pytest.mark.parametrize("backend", ["embedded", "sd3"])
def test_a_hospital_gets_nothing_to_train_on_from_a_refused_real_photo(
        backend: str, tiny_pipelines: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ClientApp's prepare step (client/hospital.py) on a real photo, with the
    shipped embedded model (not a clinic face) and with random-weight SD3 (no face
    for the dlib gate): refused, so the trainer gets no pair from it."""
    from client.hospital import load_hospital, prepare_hospital
    from skinfed.config import load_run_config

    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    overrides = [] if backend == "embedded" else [
        "backend=sd3", f"firewall.backend.model_path={tiny_pipelines['sd3']}", *REAL_PHOTO_OVERRIDES]
    cfg = load_run_config(overrides)
    hospital = tmp_path / "hospital"
    (hospital / "images").mkdir(parents=True)
    shutil.copyfile(GRACE_HOPPER, hospital / "images" / "portrait.jpg")
    assert prepare_hospital(cfg, hospital) == {"images": 1, "ok": 0, "failed": 1}
    data = load_hospital(cfg, hospital)
    assert data.train == [] and data.validation == [] and (data.accepted, data.refused) == (0, 1)


def test_the_watch_service_publishes_nothing_from_a_model_without_its_calibration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`privacy-firewall watch`, the firewall as a hospital service: a weights
    folder without its calibration refuses the clinic face too, and the published
    snapshot has nothing to train on."""
    monkeypatch.delenv("SKINFED_OVERRIDES", raising=False)
    folder = model_copy(tmp_path, drop=(OOD_FILE,))
    photos = tmp_path / "photos"
    photos.mkdir()
    write_png(photos / "clinic.png", render_subject(HELD_OUT_SEED, 5, 64).pathological)
    key = tmp_path / "key"
    key.write_text(KEY_HEX + "\n")
    code = cli.main(["watch", "--once", "-q", "--publish", str(tmp_path / "published"), str(photos),
                     str(tmp_path / "work"), f"firewall.backend.model_path={folder}", f"firewall.key_file={key}",
                     f"firewall.cache_dir={tmp_path / 'cache'}"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == cli.EXIT_FAILED and (last["ok"], last["failed"]) == (0, 1)
    from privacy_firewall.watch import read_status

    published = read_status(tmp_path / "published")  # the status the hospital's ClientApp reads
    assert (published.ok, published.failed) == (0, 1)
    assert not list((tmp_path / "published").rglob("*.png"))  # no surrogate, no mask left the firewall
