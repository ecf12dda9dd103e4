"""Membership inference on a finished simulation's global model (``skinfed-audit
--membership RUN_DIR``).

Members are the hospitals' de-identified training pairs (what the global model
was trained on); non-members are the hospitals' validation pairs (the same
firewall, the same populations, never trained on), as many of each. The shadow
models of the likelihood-ratio attack train on *public* data only: renders of
the synthetic clinic at a seed no hospital or held-out set uses, with the run's
recipe (its U-Net, ``model.*`` and, under ``federation.dp.mode=patient``, its
DP-SGD noise and clipping), centralised for ``federation.num_rounds x
model.local_epochs`` epochs unless ``--shadow-epochs`` says otherwise.

The report: AUC and TPR at 1 % FPR of each attack, the run's epsilon when it
has one. Needs the hospitals' firewall output on this machine (the simulation's
node folders).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from audit.updates.membership import membership_audit, train_shadow_models

#: The public world's clinic seed for the shadows (no hospital, held-out or sweep seed).
PUBLIC_SHADOW_SEED = 90_210


def _global_state(run_dir: Path) -> dict[str, torch.Tensor]:
    if (run_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(run_dir / "model.safetensors"))
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]


def members_and_non_members(trained: list, held_out: list, max_candidates: int, seed: int) -> tuple[list, list]:
    """As many members (training pairs) as non-members (validation pairs), at most
    ``max_candidates`` of each, drawn with ``seed``."""
    count = min(len(trained), len(held_out), max_candidates)
    rng = np.random.default_rng(seed)
    return ([trained[i] for i in rng.choice(len(trained), count, replace=False)],
            [held_out[i] for i in rng.choice(len(held_out), count, replace=False)])


def public_shadow_models(cfg, num_shadows: int, shadow_size: int, epochs: int, noise: float | None,
                         device: str = "cpu") -> list:
    """``num_shadows`` shadow models trained on public-world renders only (clinic seed
    :data:`PUBLIC_SHADOW_SEED`) with the run's recipe: its U-Net from the federation's
    public initialisation, and under patient-level DP its DP-SGD with ``noise``."""
    from models import private_training, segmentation
    from skinfed.patient_privacy import build_federated_model, is_patient_dp
    from synthetic_clinic import render_subject

    public = [render_subject(PUBLIC_SHADOW_SEED, i, cfg.data.image_size) for i in range(2 * shadow_size)]
    dp = cfg.federation.dp

    def train_shadow(images, masks, seed):
        torch.manual_seed(cfg.seed)  # the federation's public initialisation
        shadow = build_federated_model(cfg)
        if is_patient_dp(cfg):
            x = segmentation.to_batch(list(images))
            y = torch.from_numpy(np.stack(masks)).float()[:, None]
            private_training.fit_private(shadow, x, y, cfg.model, noise_multiplier=noise or dp.noise_multiplier,
                                         max_grad_norm=dp.max_grad_norm, epochs=epochs, device=device, seed=seed)
        else:
            segmentation.train_centralised_baseline(shadow, list(images), list(masks), cfg.model, epochs=epochs,
                                                    device=device, seed=seed)
        return shadow

    return train_shadow_models(train_shadow, [s.pathological for s in public], [s.mask for s in public],
                               num_shadows=num_shadows, shadow_size=shadow_size, seed=cfg.seed + 1)


def audit_run(run_dir: str | Path, num_shadows: int = 4, shadow_epochs: int | None = None,
              max_candidates: int = 64, device: str = "cpu") -> dict:
    """Both membership attacks on the run's global model (see the module docstring)."""
    from client.hospital import load_hospital
    from skinfed.data import simulation_hospitals
    from skinfed.patient_privacy import build_federated_model

    run_dir = Path(run_dir)
    cfg = _saved_config(run_dir / "config.yaml")
    model = build_federated_model(cfg)
    model.load_state_dict(_global_state(run_dir), strict=False)

    hospitals = [load_hospital(cfg, folder) for folder in simulation_hospitals(cfg, cfg.federation.num_hospitals)]
    trained = [p for h in hospitals for p in h.train]
    held_out = [p for h in hospitals for p in h.validation]
    if min(len(trained), len(held_out), max_candidates) < 2:
        raise SystemExit(f"membership audit: {len(trained)} training and {len(held_out)} validation pairs; "
                         "it needs 2 or more of each (data.val_fraction > 0)")
    members, non_members = members_and_non_members(trained, held_out, max_candidates, cfg.seed)
    count = len(members)

    epochs = shadow_epochs or cfg.federation.num_rounds * cfg.model.local_epochs
    shadow_size = max(2, len(trained))
    dp = cfg.federation.dp
    t0 = time.perf_counter()
    # Under DP the shadows get the hospitals' noise, read off the run's record.
    shadows = public_shadow_models(cfg, num_shadows, shadow_size, epochs, _run_noise(run_dir), device)
    attacks = membership_audit(model, ([p.surrogate for p in members], [p.mask for p in members]),
                               ([p.surrogate for p in non_members], [p.mask for p in non_members]), shadows, device)
    summary = json.loads((run_dir / "privacy.json").read_text()) if (run_dir / "privacy.json").is_file() else {}
    return {
        "run": run_dir.name,
        "dp_mode": dp.mode,
        "epsilon": summary.get("epsilon"),
        "delta": (summary.get("dp_accounting") or {}).get("delta"),
        "members": count, "non_members": count,
        "shadows": num_shadows, "shadow_size": shadow_size, "shadow_epochs": epochs,
        "shadow_data": f"public synthetic clinic, seed {PUBLIC_SHADOW_SEED}",
        "attacks": attacks,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _saved_config(path: Path):
    """The run's saved configuration; keys added to ``conf/`` since the run take
    their current defaults (the attack reads the model, data and DP parts)."""
    from omegaconf import OmegaConf

    from skinfed.config import ConfigError, compose, load_saved_config, run_config

    try:
        return load_saved_config(path)
    except ConfigError:
        current = compose([])
        merged = OmegaConf.merge(current, OmegaConf.load(path))
        merged.paths = current.paths
        return run_config(merged)


def _run_noise(run_dir: Path) -> float | None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    noises = [r["dp_accounting"]["noise_multiplier"] for r in metrics.get("rounds", []) if r.get("dp_accounting")]
    return float(noises[-1]) if noises else None
