"""`skinfed-audit`: attack what a hospital sends, with the firewall on and off and with DP.

    skinfed-audit [--out DIR] [--gallery 16] [--iterations 200] [--inversion-patients 1]
                  [--patients-per-hospital 8] [--hospital-trials 10]
                  [--membership RUN_DIR [--membership-only] [--shadows 4] [--shadow-epochs N]]
                  [--device cpu|cuda] [--checkpoint RUN_DIR|checkpoint.pt|model.safetensors] [key=value ...]

``key=value`` are the runs' Hydra overrides (``model.local_epochs=5``,
``firewall.identity.mode=opposite_sex``, ``federation.dp.noise_multiplier=0.5`` ...).
Progress goes to stderr; the last stdout line is one JSON object with the
headline numbers; ``audit.json`` and ``audit.png`` are written to ``--out``.

The patients are the run's world (``data.world``) at ``data.clinic_seed``; their
training labels are cut at the hospital's calibrated theta*. Besides one patient
per update, hospitals of ``--patients-per-hospital`` patients are drawn
(``--hospital-trials`` of them): one update each, every patient in it a trial.

``--membership RUN_DIR`` adds membership inference on a finished run's global
model (the loss-threshold attack and offline LiRA with shadow models trained on
public-world renders; members are the hospitals' training pairs, non-members their
validation pairs), written to ``RUN_DIR/membership.json`` and beside the linkage
in the report; the linkage attacks then use that run's model as their trained
state (``--checkpoint``). ``--membership-only`` skips the linkage.

Default budget (about 10 minutes on 2 CPU cores, the firewall's first pass
included): a gallery of 16 synthetic patients, all attacks on all 16, and one
inversion of 200 iterations (with its positive control) -- a smoke budget: the
literature runs 10k+ iterations on a GPU (``--device cuda``; the 64-px U-Net's
double backward is launch-bound, about 80-100 ms per iteration on an H100).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from audit.updates.experiment import AuditData, AuditModels, AuditSettings, run_audit
from audit.updates.inversion import InversionBudget

log = logging.getLogger("audit.updates")


@dataclass
class AuditInputs:
    data: AuditData
    models: AuditModels
    settings: AuditSettings
    epsilon_fn: object


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A run directory, its checkpoint.pt or its model.safetensors."""
    if path.is_dir():
        path = path / "model.safetensors" if (path / "model.safetensors").is_file() else path / "checkpoint.pt"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


# ----------------------------------------------------------------------------- the glue
def prepare_inputs(overrides: list[str], gallery_size: int, checkpoint: str | None,
                   settings: AuditSettings) -> AuditInputs:
    """Everything the audit needs from the project: the run config, the clinic's
    patients, the firewall's surrogates, the U-Net, its loss and local training.
    (The only function that knows the project's config and data API.)"""
    from models import segmentation
    from privacy_firewall.calibration import cohort_masks
    from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall
    from skinfed.config import load_run_config
    from skinfed.differential_privacy import DpSettings, epsilon_per_round
    from synthetic_clinic import render_subject

    cfg = load_run_config(overrides)
    size = cfg.data.image_size

    # The hospital's patients: subjects of the synthetic clinic's world of the run
    # (data.world), through its firewall.
    subjects = [render_subject(cfg.data.clinic_seed, i, size, world=cfg.data.world) for i in range(gallery_size)]
    firewall = PrivacyFirewall(cfg.firewall)
    print(f"privacy firewall on {gallery_size} photos (cached after the first audit)", file=sys.stderr)
    twins = firewall.run([PhotoRequest(s.pathological, sex=s.subject.sex) for s in subjects], progress=True)
    # The training labels at the hospital's own threshold: theta* calibrated on its
    # cohort (the gallery's patients) as `deidentify` does, or the configured one.
    cohort = cohort_masks(twins, [None] * len(twins), cfg.firewall.mask)
    # Patients first (the firewall accepted them), then the photos it refused: they stay in the
    # gallery as other people (fail closed: a refused photo is never trained on).
    order = [i for i, t in enumerate(twins) if t.ok] + [i for i, t in enumerate(twins) if not t.ok]
    patients = [i for i in order if twins[i].ok]
    if len(patients) < 2:
        reasons = sorted({t.reason for t in twins if not t.ok})
        raise SystemExit(f"skinfed-audit: the firewall accepted {len(patients)} of {gallery_size} photos, the audit "
                         f"needs 2 or more; it refused them because: {'; '.join(reasons)}")
    data = AuditData(
        originals=[subjects[i].pathological for i in order],
        # Firewall off, the hospital would train on the photos with their ground-truth masks.
        original_masks=[subjects[i].mask for i in order],
        surrogates=[twins[i].surrogate for i in patients],
        surrogate_masks=[cohort.masks[i] for i in patients],
    )

    # The model the server sends in round 1 (as the ServerApp builds it), its loss,
    # and the hospital's local training (the same loop as segmentation.train).
    torch.manual_seed(cfg.seed)
    initial = segmentation.build_model(cfg.model)
    loss_fn = segmentation.SegmentationLoss(cfg.model.dice_weight, cfg.model.bce_weight)

    def local_training(model, images, masks, seed):
        segmentation.train_centralised_baseline(model, list(images), list(masks), cfg.model,
                                                epochs=cfg.model.local_epochs, seed=seed)

    trained = segmentation.build_model(cfg.model)
    if checkpoint:
        trained.load_state_dict(_load_state(Path(checkpoint).expanduser()))
        trained_from = f"checkpoint {Path(checkpoint).name}"
    else:
        # A trained state without a run: one round of local training on other subjects.
        # The attacker trains it himself, so on the public world only (no hospital-world
        # photo reaches a model except through the federation).
        trained.load_state_dict(initial.state_dict())
        others = [render_subject(cfg.data.clinic_seed, gallery_size + i, size, world="public") for i in range(24)]
        print("training a model state for the trained-state attacks", file=sys.stderr)
        local_training(trained, [s.pathological for s in others], [s.mask for s in others], cfg.seed)
        trained_from = (f"one round of local training ({cfg.model.local_epochs} epochs) on 24 other "
                        "public-world subjects")

    # The hospital's training seed is secret (client/hospital.py: training_seed); the
    # audit picks one, and an attacker who does not know it replays with another.
    hospital_seed = cfg.seed * 1_000_003 + 1009
    hospitals = cfg.federation.num_hospitals or 4
    dp = cfg.federation.dp
    settings = replace(
        settings, hospital_seed=hospital_seed, other_seed=hospital_seed + 7919,
        num_sampled_clients=max(1, round(hospitals * cfg.federation.fraction_train)), delta=dp.delta,
        num_rounds=cfg.federation.num_rounds, mask_threshold=cohort.theta,
        noise_multiplier=dp.noise_multiplier if dp.mode != "off" else settings.noise_multiplier,
        clipping_norm=dp.clipping_norm if dp.mode == "client-fixed" else settings.clipping_norm,
    )

    def epsilon_fn(z: float, delta: float, rounds: int) -> float:
        dp_settings = DpSettings(mode="client-fixed", noise_multiplier=z, clipping_norm=1.0,
                                 num_sampled_clients=settings.num_sampled_clients, population_size=hospitals,
                                 delta=delta)
        return epsilon_per_round(dp_settings, rounds)[-1]

    models = AuditModels(initial=initial, trained=trained, loss_fn=loss_fn, train=local_training,
                         trained_from=trained_from)
    return AuditInputs(data=data, models=models, settings=settings, epsilon_fn=epsilon_fn)


# ----------------------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skinfed-audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: <paths.home>/audits/<time>)")
    parser.add_argument("--gallery", type=int, default=16, help="candidate photos (all are patients)")
    parser.add_argument("--iterations", type=int, default=InversionBudget.iterations,
                        help="inversion iterations (the literature uses 10k+ on a GPU)")
    parser.add_argument("--inversion-patients", type=int, default=1, help="0 skips the inversion")
    parser.add_argument("--tv-weight", type=float, default=InversionBudget.tv_weight)
    parser.add_argument("--start", choices=("noise", "average_face"), default="noise",
                        help="the inversion's starting image (average_face: the gallery's mean)")
    parser.add_argument("--device", default="cpu",
                        help="where the inversion runs: auto, cpu, cuda or cuda:N (the attacks on updates stay on the CPU)")
    parser.add_argument("--patients-per-hospital", type=int, default=AuditSettings.patients_per_hospital,
                        help="patients behind one update in the hospital linkage (< 2 skips it)")
    parser.add_argument("--hospital-trials", type=int, default=AuditSettings.hospital_trials,
                        help="hospitals drawn for the hospital linkage (each patient in one is a trial)")
    parser.add_argument("--membership", metavar="RUN_DIR", default=None,
                        help="membership inference on this finished run's global model")
    parser.add_argument("--membership-only", action="store_true", help="with --membership: skip the linkage")
    parser.add_argument("--shadows", type=int, default=4, help="LiRA shadow models (2 or more)")
    parser.add_argument("--shadow-epochs", type=int, default=None,
                        help="shadow training epochs (default federation.num_rounds x model.local_epochs)")
    parser.add_argument("--max-candidates", type=int, default=64, help="members and non-members, each")
    parser.add_argument("--checkpoint", default=None, help="a trained global model for the trained-state attacks")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for the runs")
    args = parser.parse_args(argv)
    if args.gallery < 2:
        parser.error(f"--gallery must be at least 2, got {args.gallery}")
    run_dir = Path(args.membership).expanduser() if args.membership else None
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        parser.error(f"--membership {args.membership} is not a run directory (no config.yaml); "
                     "give the folder of a finished skinfed-run")
    if args.membership_only and run_dir is None:
        parser.error("--membership-only needs --membership RUN_DIR")
    if args.shadows < 2:
        parser.error(f"--shadows must be 2 or more, got {args.shadows}")
    if args.hospital_trials < 0:
        parser.error(f"--hospital-trials must be 0 or more, got {args.hospital_trials}")
    if args.patients_per_hospital >= 2 and args.patients_per_hospital > args.gallery:
        parser.error(f"--patients-per-hospital {args.patients_per_hospital} is more than the gallery "
                     f"({args.gallery}); raise --gallery or lower it")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from common.config import ConfigError, reject_foreign_overrides
    from common.device import resolve_device
    from skinfed.config import RUN_PARTS

    try:  # before any work
        reject_foreign_overrides(args.overrides, RUN_PARTS, "skinfed-audit")
        device = str(resolve_device(args.device, "--device"))
    except ConfigError as exc:
        parser.error(str(exc))
    torch.set_num_threads(max(1, int(os.environ.get("SKINFED_THREADS", os.cpu_count() or 1))))

    membership = None
    if run_dir is not None:
        from audit.updates.global_model import audit_run
        from common.io import atomic_write_json

        print(f"membership inference on the global model of {run_dir.name}", file=sys.stderr)
        membership = audit_run(run_dir, args.shadows, args.shadow_epochs, args.max_candidates, device)
        atomic_write_json(run_dir / "membership.json", membership)
        if args.membership_only:
            print(json.dumps(membership, default=_jsonable))
            return 0
        args.checkpoint = args.checkpoint or str(run_dir)

    start, cpu_start = time.perf_counter(), time.process_time()
    settings = AuditSettings(
        inversion=InversionBudget(iterations=args.iterations, tv_weight=args.tv_weight, start=args.start),
        inversion_patients=args.inversion_patients,
        inversion_device=device,
        patients_per_hospital=args.patients_per_hospital,
        hospital_trials=args.hospital_trials,
    )
    inputs = prepare_inputs(args.overrides, args.gallery, args.checkpoint, settings)
    prepared, prepared_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = run_audit(inputs.data, inputs.models, inputs.settings, epsilon_fn=inputs.epsilon_fn)
    if membership is not None:
        result.report["membership"] = membership
        for attack, r in membership["attacks"].items():
            result.report["summary"][f"membership_auc_{attack}"] = r["auc"]
            result.report["summary"][f"membership_tpr_at_1pct_fpr_{attack}"] = r["tpr_at_1pct_fpr"]
    result.report["seconds"] = {"prepare (firewall, models)": round(prepared, 2), **result.report["seconds"]}
    result.report["cpu_seconds"] = {"prepare (firewall, models)": round(prepared_cpu, 2), **result.report["cpu_seconds"]}
    result.report["summary"]["seconds"] = round(time.perf_counter() - start, 1)
    result.report["summary"]["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    result.report["summary"]["threads"] = torch.get_num_threads()

    out = Path(args.out) if args.out else _default_out(args.overrides)
    from audit.updates.report import json_safe, write_report

    paths = write_report(out, result.report, result.images, inputs.data.originals, inputs.data.surrogates)
    print(f"audit written to {paths['report']} and {paths['figure']}", file=sys.stderr)
    summary = {**result.report["summary"], "report": paths["report"], "figure": paths["figure"]}
    print(json.dumps(json_safe(summary), default=_jsonable))
    return 0


def _default_out(overrides: list[str]) -> Path:
    from skinfed.config import load_run_config

    home = Path(load_run_config(overrides).paths.home).expanduser()
    return home / "audits" / time.strftime("%Y%m%d-%H%M%S")


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
