"""The audit: every attack on every kind of update, firewall on and off, DP on.

The set-up (one hospital per trial, the strongest case for the attacker): the
gallery holds the photos of ``P`` patients and optionally other people. In trial
``i`` the hospital trains on patient ``i`` only: on the firewall's surrogate and
its differential mask (firewall on), or on the photo itself (firewall off). The
attacker sees the update and ranks the gallery. Patient ``i`` is linked when it
outranks everyone the hospital did not train on (chance: 1 / gallery size).

Updates attacked:

* ``fedsgd_b1_*`` / ``fedsgd_b4_*``: the gradient of one step on 1 or 4 patients
  at the initial model and at a trained one, against each candidate's gradient
  at the same state (``*_shared_mask``: every candidate labelled with the same
  mask, so only the image can make the link);
* ``fedavg_gradient``: the real FedAvg update (the configured local training)
  against the candidates' one-step gradients (an attacker who does not replay);
* ``fedavg_replay_seed_known`` / ``_seed_secret``: the real FedAvg update against
  the attacker's replay of the same local training on each candidate, with the
  hospital's training seed (an attacker who knows it, the worst case: it is
  derived from the hospital's secret key), or with another seed (it is secret);
* ``fedavg_replay_erythema_only`` / ``_image_only``: controls of what carries the
  link: the attacker replays each candidate's mask on the gallery's average face
  (the erythema alone), or each candidate's photo with one shared mask (the image
  alone);
* ``pixel_nearest_neighbour``: no attack, the surrogate's own pixel-nearest
  original, the reference the update attacks should be read against;
* ``mask_nearest_neighbour`` / ``mask_size_and_count``: the surrogate's own mask
  (its training label) against the candidates' masks, by IoU (outline and
  place), or by the erythema's size and number of patches alone.

Differential privacy (:mod:`audit.updates.dp_view`): the hospital's update is
clipped to ``C`` and noised with ``z C`` per coordinate (a worst-case observer
of the noised aggregate); ``z = 0`` is what the server itself sees under
client-side clipping.

Inversion (:mod:`audit.updates.inversion`) on the one-step gradient of one
image at the initial model, with the raw photo's gradient as positive control.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from audit.updates import dp_view
from audit.updates.capture import (
    LocalTraining,
    Update,
    fedavg_update,
    fedsgd_gradient,
    shared_state_names,
    to_tensors,
    update_norm,
    used_parameters,
)
from audit.updates.inversion import InversionBudget, invert_gradient, score_reconstruction, verdict
from audit.updates.linkage import (
    LinkageResult,
    layer_signature,
    link_rates,
    mask_iou_matrix,
    mask_size_and_count_matrix,
    pixel_similarity_matrix,
    similarity_matrix,
)

log = logging.getLogger(__name__)

EpsilonFn = Callable[[float, float, int], float]
"""(noise_multiplier, delta, rounds) -> epsilon."""


@dataclass
class AuditData:
    """The gallery and the hospital's training data; index ``i`` is the same
    person in every list. The first ``len(surrogates)`` gallery entries are the
    patients (each trained on in its own trial), the rest are other people."""

    originals: list[np.ndarray]  # every candidate's photo, RGB uint8
    original_masks: list[np.ndarray]  # their masks: the raw photos' training labels and the attacker's labels
    surrogates: list[np.ndarray]  # the firewall's surrogate of each patient
    surrogate_masks: list[np.ndarray]  # its differential mask: the hospital's training label

    def __post_init__(self) -> None:
        if len(self.originals) != len(self.original_masks):
            raise ValueError("one mask per gallery photo")
        if len(self.surrogates) != len(self.surrogate_masks) or len(self.surrogates) > len(self.originals):
            raise ValueError("one surrogate and one mask per patient, and the patients are in the gallery")
        if len(self.surrogates) < 2:
            raise ValueError("the audit needs at least 2 patients")

    @property
    def num_patients(self) -> int:
        return len(self.surrogates)


@dataclass
class AuditModels:
    """The model states the attacker knows (it is the server), the loss and the
    hospital's local training."""

    initial: nn.Module  # the global model a hospital receives in round 1
    trained: nn.Module | None  # a trained global model (later rounds), or None
    loss_fn: nn.Module
    train: LocalTraining
    trained_from: str = ""  # where the trained state comes from, for the report


@dataclass(frozen=True)
class AuditSettings:
    """What the audit runs. The defaults fit 10 minutes on 2 CPU cores with the
    project's 64-px U-Net and a 16-photo gallery."""

    fedsgd_batch_sizes: tuple[int, ...] = (1, 4)
    hospital_seed: int = 0  # the hospital's local training seed
    other_seed: int = 1  # what an attacker replays with when the hospital's seed is secret (any other seed)
    inversion: InversionBudget = field(default_factory=InversionBudget)
    inversion_patients: int = 1  # 0 skips the inversion
    inversion_device: str = "cpu"  # where the inversion runs ("cuda" for the literature's 10k+ iterations)
    noise_multiplier: float = 1.0  # the DP setting of the headline numbers
    noise_multipliers: tuple[float, ...] = (0.0, 0.001, 0.01, 0.1, 1.0)  # the sweep (0 = clipping only)
    clipping_norm: float | None = None  # of FedAvg updates; None = median norm of the hospitals' updates
    num_sampled_clients: int = 4  # hospitals in a round (the noise on the mean is z C / n)
    delta: float = 1e-5
    num_rounds: int = 5  # epsilon is also reported after this many rounds
    noise_seed: int = 0
    mask_threshold: float | None = None  # the hospital's theta* its training labels were cut at (for the report)
    patients_per_hospital: int = 8  # hospitals of several patients: one update, many patients (< 2 skips them)
    hospital_trials: int = 10  # such hospitals drawn from the patients (each patient a trial per hospital)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AuditResult:
    report: dict  # everything, JSON-ready
    images: dict[str, np.ndarray]  # for the figure: true image, surrogate, reconstructions


class Stopwatch:
    """Wall-clock and CPU seconds per stage (CPU time is what the stage would take
    on an idle core when it runs on one thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[name] = round(now - self._start, 2)
        self.cpu_seconds[name] = round(cpu - self._cpu, 2)
        self._start, self._cpu = now, cpu


def _gradients(model: nn.Module, loss_fn: nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
               names: Sequence[str], batch_size: int, label: str) -> list[Update]:
    """One-step gradients of consecutive batches of ``batch_size`` images."""
    out = []
    for start in tqdm(range(0, len(images) - batch_size + 1, batch_size), desc=label, unit="grad", leave=False):
        x, y = to_tensors(images[start : start + batch_size], masks[start : start + batch_size])
        out.append({n: g.detach() for n, g in fedsgd_gradient(model, loss_fn, x, y, names).items()})
    return out


def _signatures(updates: Sequence[Update], names: Sequence[str], negate: bool = False) -> torch.Tensor:
    sign = -1.0 if negate else 1.0
    return torch.stack([sign * layer_signature(u, names) for u in updates])


def _shared_mask(masks: Sequence[np.ndarray]) -> np.ndarray:
    """One mask for every candidate: where at least a quarter of the gallery has
    erythema (the typical locations), or the first mask if that is empty."""
    typical = np.mean(np.stack(masks).astype(np.float64), axis=0) >= 0.25
    return typical if typical.any() else np.asarray(masks[0], dtype=bool)


def _dp_epsilon(epsilon_fn: EpsilonFn | None, z: float, delta: float, rounds: int) -> float | None:
    if epsilon_fn is None:
        return None
    return float("inf") if z <= 0 else float(epsilon_fn(z, delta, rounds))


def run_audit(data: AuditData, models: AuditModels, settings: AuditSettings,
              epsilon_fn: EpsilonFn | None = None) -> AuditResult:
    """Run every attack; ``epsilon_fn`` turns a noise multiplier into epsilon
    (Flower's accountant, :func:`skinfed.differential_privacy.epsilon_per_round`)."""
    torch.manual_seed(0)
    clock = Stopwatch()
    p = data.num_patients
    patients = list(range(p))
    gallery, gallery_masks = data.originals, data.original_masks
    trials_b1 = [[i] for i in patients]
    linkage: dict[str, dict[str, LinkageResult]] = {}
    norms: dict[str, float] = {}

    # The gallery's average face: the erythema-only control's image and an inversion start.
    average_face = np.mean(np.stack(gallery).astype(np.float64), axis=0).round().astype(np.uint8)
    x0, y0 = to_tensors(gallery[:1], gallery_masks[:1])
    names = used_parameters(models.initial, models.loss_fn, x0, y0)
    state_names = shared_state_names(models.initial, names)

    # -- reference: the surrogates' own pixel-nearest originals ----------------------------
    linkage["pixel_nearest_neighbour"] = {
        "firewall": link_rates(pixel_similarity_matrix(data.surrogates, gallery), trials_b1)
    }
    clock.lap("pixel_nearest_neighbour")
    # ... and the surrogates' own masks (the training labels) against the candidates':
    # by outline and place (IoU), and by size and number of patches alone.
    linkage["mask_nearest_neighbour"] = {
        "firewall": link_rates(mask_iou_matrix(data.surrogate_masks, gallery_masks), trials_b1)
    }
    linkage["mask_size_and_count"] = {
        "firewall": link_rates(mask_size_and_count_matrix(data.surrogate_masks, gallery_masks), trials_b1)
    }

    # -- one step (FedSGD) at the initial and a trained state ------------------------------
    states = [("initial", models.initial)] + ([("trained", models.trained)] if models.trained is not None else [])
    gradient_b1: dict[str, dict[str, list[Update]]] = {}
    candidate_sigs: dict[str, torch.Tensor] = {}
    for state, model in states:
        candidate_gradients = _gradients(model, models.loss_fn, gallery, gallery_masks, names, 1,
                                         f"candidate gradients ({state})")
        candidates = candidate_sigs[state] = _signatures(candidate_gradients, names)
        del candidate_gradients
        for batch in settings.fedsgd_batch_sizes:
            usable = p - p % batch
            if usable < batch:
                continue
            members = [list(range(s, s + batch)) for s in range(0, usable, batch)]
            results = {}
            for kind, images, masks in (("firewall", data.surrogates, data.surrogate_masks),
                                        ("raw", gallery[:p], gallery_masks[:p])):
                observed = _gradients(model, models.loss_fn, images[:usable], masks[:usable], names, batch,
                                      f"{kind} gradients b{batch} ({state})")
                if batch == 1:
                    gradient_b1.setdefault(state, {})[kind] = observed
                results[kind] = link_rates(similarity_matrix(_signatures(observed, names), candidates), members)
            linkage[f"fedsgd_b{batch}_{state}"] = results
        clock.lap(f"fedsgd_{state}")

    # The link without the mask: every candidate labelled with the same mask.
    shared = [_shared_mask(gallery_masks)] * len(gallery)
    candidates_shared = _signatures(_gradients(models.initial, models.loss_fn, gallery, shared, names, 1,
                                               "candidate gradients (shared mask)"), names)
    linkage["fedsgd_b1_initial_shared_mask"] = {
        kind: link_rates(similarity_matrix(_signatures(gradient_b1["initial"][kind], names), candidates_shared),
                         trials_b1)
        for kind in ("firewall", "raw")
    }
    clock.lap("fedsgd_shared_mask")

    # -- the real FedAvg update and the attacker's replays ---------------------------------
    def local_updates(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], seed: int, label: str) -> list[Update]:
        return [fedavg_update(models.initial, models.train, [img], [m], seed, state_names)
                for img, m in tqdm(list(zip(images, masks)), desc=label, unit="hospital", leave=False)]

    observed_firewall = local_updates(data.surrogates, data.surrogate_masks, settings.hospital_seed,
                                      "local training on surrogates")
    replay_known_updates = local_updates(gallery, gallery_masks, settings.hospital_seed, "replays (seed known)")
    replay_secret_updates = local_updates(gallery, gallery_masks, settings.other_seed, "replays (other seed)")
    # Firewall off: the hospital trains on the photos, so its update with the public
    # seed *is* the attacker's replay of the patient; with a secret seed it is the
    # replay under the other seed.
    observed_raw = replay_known_updates[:p]
    observed_raw_secret = replay_secret_updates[:p]
    clock.lap("fedavg_local_training")

    # Controls: what carries the link? Replays of every candidate on the gallery's
    # average face with the candidate's mask (the erythema alone), and on the
    # candidate's photo with one shared mask (the image alone).
    replay_mask_only = _signatures(local_updates([average_face] * len(gallery), gallery_masks, settings.other_seed,
                                                 "replays (erythema only)"), state_names)
    replay_image_only = _signatures(local_updates(gallery, shared, settings.other_seed, "replays (image only)"),
                                    state_names)
    clock.lap("fedavg_controls")

    replay_known = _signatures(replay_known_updates, state_names)
    replay_secret = _signatures(replay_secret_updates, state_names)
    obs_fw, obs_raw = _signatures(observed_firewall, state_names), _signatures(observed_raw, state_names)
    obs_raw_secret = _signatures(observed_raw_secret, state_names)
    del replay_secret_updates, observed_raw_secret  # only their signatures are needed from here on
    def replay_linkage(firewall_candidates: torch.Tensor, raw: torch.Tensor,
                       raw_candidates: torch.Tensor) -> dict[str, LinkageResult]:
        return {"firewall": link_rates(similarity_matrix(obs_fw, firewall_candidates), trials_b1),
                "raw": link_rates(similarity_matrix(raw, raw_candidates), trials_b1)}

    linkage["fedavg_replay_seed_known"] = replay_linkage(replay_known, obs_raw, replay_known)
    # The hospital trained with its seed, the attacker replays with another one.
    linkage["fedavg_replay_seed_secret"] = replay_linkage(replay_secret, obs_raw_secret, replay_known)
    linkage["fedavg_replay_erythema_only"] = replay_linkage(replay_mask_only, obs_raw_secret, replay_mask_only)
    linkage["fedavg_replay_image_only"] = replay_linkage(replay_image_only, obs_raw_secret, replay_image_only)
    # -- hospitals of several patients: one update, k patients in it ----------------------
    if settings.patients_per_hospital >= 2 and p >= settings.patients_per_hospital and settings.hospital_trials > 0:
        linkage.update(hospital_linkage(data, models, settings, state_names, names, replay_secret,
                                        candidate_sigs["initial"]))
        clock.lap("fedavg_hospitals")

    # An attacker who does not replay: the update moves against the gradient.
    candidates_initial = candidate_sigs["initial"]
    linkage["fedavg_gradient"] = {
        "firewall": link_rates(similarity_matrix(_signatures(observed_firewall, names, negate=True),
                                                 candidates_initial), trials_b1),
        "raw": link_rates(similarity_matrix(_signatures(observed_raw, names, negate=True), candidates_initial),
                          trials_b1),
    }
    norms["fedavg_update_median"] = float(np.median([update_norm(u) for u in observed_firewall]))
    norms["fedavg_update_median_raw"] = float(np.median([update_norm(u) for u in observed_raw]))
    running = [n for n in state_names if n not in set(names)]
    norms["fedavg_running_statistics_share"] = float(np.median(
        [update_norm({n: u[n] for n in running}) ** 2 / max(update_norm(u) ** 2, 1e-30) for u in observed_firewall]))
    clock.lap("fedavg_linkage")

    # -- differential privacy ---------------------------------------------------------------
    rng = np.random.default_rng(settings.noise_seed)
    clip_fedavg = settings.clipping_norm or norms["fedavg_update_median"]
    clip_grad = float(np.median([update_norm(g) for g in gradient_b1["initial"]["firewall"]]))
    norms["fedsgd_gradient_median"] = clip_grad
    n = settings.num_sampled_clients

    def dp_signatures(updates: Sequence[Update], clip: float, z: float, sig_names: Sequence[str]) -> torch.Tensor:
        return torch.stack([layer_signature(dp_view.observed_under_central_dp(u, clip, z, n, rng), sig_names)
                            for u in updates])

    dp_sweep = []
    noise_multipliers = sorted(set(settings.noise_multipliers) | {settings.noise_multiplier, 0.0})
    for z in tqdm(noise_multipliers, desc="DP sweep", leave=False):
        row = {"noise_multiplier": z, "clipping_norm": clip_fedavg,
               "epsilon_1_round": _dp_epsilon(epsilon_fn, z, settings.delta, 1),
               f"epsilon_{settings.num_rounds}_rounds": _dp_epsilon(epsilon_fn, z, settings.delta, settings.num_rounds)}
        results = {kind: link_rates(similarity_matrix(dp_signatures(observed, clip_fedavg, z, state_names),
                                                      replay_known), trials_b1)
                   for kind, observed in (("firewall", observed_firewall), ("raw", observed_raw))}
        row.update({f"replay_top1_{kind}": r.top1 for kind, r in results.items()})
        dp_sweep.append(row)
        if z == settings.noise_multiplier:
            linkage["fedavg_replay_seed_known_dp"] = results
        if z == 0.0:
            # What the server itself receives under client-side clipping: clipped, not noised.
            linkage["fedavg_replay_seed_known_server_view"] = results
    linkage["fedsgd_b1_initial_dp"] = {
        kind: link_rates(similarity_matrix(dp_signatures(gradient_b1["initial"][kind], clip_grad,
                                                         settings.noise_multiplier, names), candidates_initial),
                         trials_b1)
        for kind in ("firewall", "raw")
    }
    clock.lap("differential_privacy")

    # -- inversion ---------------------------------------------------------------------------
    inversion: dict = {"budget": asdict(settings.inversion), "patients": []}
    images: dict[str, np.ndarray] = {}
    control_ok: list[bool] = []
    attack_ok: list[bool] = []
    dp_attack_ok: list[bool] = []
    start = average_face if settings.inversion.start == "average_face" else None
    # The attack model (the server knows it) where the inversion runs; its gradients are
    # those computed above, on the CPU, as the hospital sent them.
    attack_model = models.initial
    if settings.inversion_patients > 0 and settings.inversion_device != "cpu":
        attack_model = copy.deepcopy(models.initial).to(settings.inversion_device)
    for i in range(min(settings.inversion_patients, p)):
        entry, entry_images = invert_patient(
            data, i, attack_model, models.loss_fn, gradient_b1["initial"]["firewall"][i],
            gradient_b1["initial"]["raw"][i], settings.inversion, start=start,
            add_dp_noise=lambda g: dp_view.observed_under_central_dp(g, clip_grad, settings.noise_multiplier, n, rng))
        attack_ok.append(entry["firewall"]["identifies_patient"])
        control_ok.append(entry["raw"]["identifies_patient"])
        if "firewall_dp" in entry:
            dp_attack_ok.append(entry["firewall_dp"]["identifies_patient"])
        images.update(entry_images)
        inversion["patients"].append(entry)
    if inversion["patients"]:
        inversion["verdict_firewall"] = verdict(attack_ok, control_ok)
        inversion["verdict_raw"] = verdict(control_ok, control_ok)
        inversion["verdict_firewall_dp"] = verdict(dp_attack_ok, control_ok) if dp_attack_ok else verdict([], control_ok)
    clock.lap("inversion")

    report = {
        "settings": settings.to_dict(),
        "gallery_size": len(gallery),
        "num_patients": p,
        "trained_state": models.trained_from if models.trained is not None else None,
        "linkage": {k: {kind: r.to_dict() for kind, r in v.items()} for k, v in linkage.items()},
        "dp_sweep": dp_sweep,
        "norms": norms,
        "inversion": inversion,
        "seconds": clock.seconds,
        "cpu_seconds": clock.cpu_seconds,
    }
    report["summary"] = summarise(report)
    return AuditResult(report=report, images=images)


def hospital_linkage(data: AuditData, models: AuditModels, settings: AuditSettings, state_names: Sequence[str],
                     names: Sequence[str], replays: torch.Tensor, candidate_gradients: torch.Tensor
                     ) -> dict[str, dict[str, LinkageResult]]:
    """Hospitals of ``settings.patients_per_hospital`` patients, drawn from the
    patients ``settings.hospital_trials`` times: one FedAvg update each, on the
    surrogates and (the positive control) on the raw photos. The attacker replays
    every candidate alone (``replays``: he does not know who else the hospital
    holds) or takes its one-step gradient, and ranks the candidates by how well
    they match the update; each of the k patients is a trial, linked when it
    outranks every non-member."""
    k, gallery, gallery_masks = settings.patients_per_hospital, data.originals, data.original_masks
    draw = np.random.default_rng(settings.noise_seed + 1)
    hospital_sets = [sorted(int(i) for i in draw.choice(data.num_patients, k, replace=False))
                     for _ in range(settings.hospital_trials)]

    def updates(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], label: str) -> list[Update]:
        return [fedavg_update(models.initial, models.train, [images[i] for i in members], [masks[i] for i in members],
                              settings.hospital_seed + t, state_names)
                for t, members in enumerate(tqdm(hospital_sets, desc=label, unit="hospital", leave=False))]

    observed = {"firewall": updates(data.surrogates, data.surrogate_masks, f"hospitals of {k} (surrogates)"),
                "raw": updates(gallery, gallery_masks, f"hospitals of {k} (raw photos)")}
    return {
        f"fedavg_hospital_of_{k}_replay_seed_secret": {
            kind: link_rates(similarity_matrix(_signatures(u, state_names), replays), hospital_sets)
            for kind, u in observed.items()},
        f"fedavg_hospital_of_{k}_gradient": {
            kind: link_rates(similarity_matrix(_signatures(u, names, negate=True), candidate_gradients), hospital_sets)
            for kind, u in observed.items()},
    }


def invert_patient(data: AuditData, i: int, attack_model: nn.Module, loss_fn: nn.Module, gradient_firewall: Update,
                   gradient_raw: Update, budget: InversionBudget, start: np.ndarray | None = None,
                   add_dp_noise: Callable[[Update], Update] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Invert patient ``i``'s one-step gradients: the surrogate's (the attack) and
    the raw photo's (the positive control, same budget); with ``add_dp_noise``, the
    surrogate's gradient after DP's clipping and noise too, where the control shows
    the attack works at this budget. Returns the report entry and its images."""
    gallery = data.originals
    entry: dict = {"patient": i}
    images: dict[str, np.ndarray] = {}

    def attack(kind: str, observed: Update, mask: np.ndarray, reference: np.ndarray) -> None:
        recon, trace = invert_gradient(attack_model, loss_fn, observed, mask, gallery[i].shape[0], budget,
                                       progress_label=f"inversion {kind} #{i}", start=start)
        entry[kind] = {**score_reconstruction(recon, reference, gallery, i).to_dict(), "trace": trace}
        images[f"reconstruction_{kind}_{i}"] = recon

    attack("firewall", gradient_firewall, data.surrogate_masks[i], data.surrogates[i])
    attack("raw", gradient_raw, data.original_masks[i], gallery[i])
    # DP only where the control shows the attack works at this budget (else nothing to learn).
    if add_dp_noise is not None and entry["raw"]["identifies_patient"]:
        attack("firewall_dp", add_dp_noise(gradient_firewall), data.surrogate_masks[i], data.surrogates[i])
    images[f"patient_{i}"], images[f"surrogate_{i}"] = gallery[i], data.surrogates[i]
    return entry, images


def summarise(report: dict) -> dict:
    """The headline numbers (the command's last stdout line)."""
    link = report["linkage"]
    inv = report["inversion"]
    first = inv["patients"][0] if inv.get("patients") else {}
    z = report["settings"]["noise_multiplier"]
    dp_row = next((r for r in report["dp_sweep"] if r["noise_multiplier"] == z), {})
    s = report["settings"]
    return {
        # The real FedAvg update; the attacker replays the local training on every
        # candidate with its own seed (the hospital's training seed is secret).
        "linkage_top1_raw": link["fedavg_replay_seed_secret"]["raw"]["top1"],
        "linkage_top1_firewall": link["fedavg_replay_seed_secret"]["firewall"]["top1"],
        "linkage_top5_firewall": link["fedavg_replay_seed_secret"]["firewall"]["top5"],
        "linkage_top1_firewall_ci95": link["fedavg_replay_seed_secret"]["firewall"]["top1_ci95"],
        # how often the patient outscores a candidate it is not (0.5 = chance, any gallery size)
        "linkage_auc_raw": link["fedavg_replay_seed_secret"]["raw"]["auc"],
        "linkage_auc_firewall": link["fedavg_replay_seed_secret"]["firewall"]["auc"],
        # ... with the hospital's seed (an attacker who knows it)
        "linkage_top1_raw_seed_known": link["fedavg_replay_seed_known"]["raw"]["top1"],
        "linkage_top1_firewall_seed_known": link["fedavg_replay_seed_known"]["firewall"]["top1"],
        # ... without replay: candidates' one-step gradients
        "linkage_top1_firewall_no_replay": link["fedavg_gradient"]["firewall"]["top1"],
        # ... what carries the link: the erythema alone, the image alone
        "linkage_top1_firewall_erythema_only": link["fedavg_replay_erythema_only"]["firewall"]["top1"],
        "linkage_top1_firewall_image_only": link["fedavg_replay_image_only"]["firewall"]["top1"],
        # DP on (seed known, the strongest case); the server's own view is clipped, not noised
        "linkage_top1_raw_dp": link["fedavg_replay_seed_known_dp"]["raw"]["top1"],
        "linkage_top1_firewall_dp": link["fedavg_replay_seed_known_dp"]["firewall"]["top1"],
        "linkage_top1_firewall_dp_server_view": link["fedavg_replay_seed_known_server_view"]["firewall"]["top1"],
        # one step, batch 1, initial model: gradient matching
        "linkage_top1_raw_fedsgd": link["fedsgd_b1_initial"]["raw"]["top1"],
        "linkage_top1_firewall_fedsgd": link["fedsgd_b1_initial"]["firewall"]["top1"],
        "linkage_chance": link["fedavg_replay_seed_secret"]["firewall"]["chance_top1"],
        "linkage_chance_top5": link["fedavg_replay_seed_secret"]["firewall"]["chance_top5"],
        **_hospital_summary(link, s["patients_per_hospital"]),
        "pixel_nearest_neighbour_top1": link["pixel_nearest_neighbour"]["firewall"]["top1"],
        "mask_nearest_neighbour_top1": link["mask_nearest_neighbour"]["firewall"]["top1"],
        "mask_size_and_count_top1": link["mask_size_and_count"]["firewall"]["top1"],
        "mask_size_and_count_auc": link["mask_size_and_count"]["firewall"]["auc"],
        "inversion_psnr_patient": first.get("firewall", {}).get("psnr_patient"),
        "inversion_psnr_surrogate": first.get("firewall", {}).get("psnr_reference"),
        "inversion_psnr_patient_raw": first.get("raw", {}).get("psnr_patient"),
        "inversion_average_face_psnr": first.get("firewall", {}).get("average_face_psnr"),
        "inversion_verdict": inv.get("verdict_firewall", "not run"),
        "inversion_verdict_raw": inv.get("verdict_raw", "not run"),
        "inversion_verdict_dp": inv.get("verdict_firewall_dp", "not run"),
        "dp_noise_multiplier": z,
        "dp_clipping_norm": dp_row.get("clipping_norm"),
        "dp_delta": s["delta"],
        "dp_epsilon_1_round": dp_row.get("epsilon_1_round"),
        f"dp_epsilon_{s['num_rounds']}_rounds": dp_row.get(f"epsilon_{s['num_rounds']}_rounds"),
        "budget": {"gallery_size": report["gallery_size"], "patients": report["num_patients"],
                   "inversion_iterations": s["inversion"]["iterations"],
                   "inversion_patients": min(s["inversion_patients"], report["num_patients"]),
                   "fedsgd_batch_sizes": list(s["fedsgd_batch_sizes"])},
        "seconds": round(sum(report["seconds"].values()), 1),
    }


def _hospital_summary(link: dict, k: int) -> dict:
    """The headline numbers of the hospitals of ``k`` patients (none when skipped)."""
    replay, gradient = link.get(f"fedavg_hospital_of_{k}_replay_seed_secret"), link.get(f"fedavg_hospital_of_{k}_gradient")
    if replay is None:
        return {}
    return {
        "hospital_linkage_patients_per_hospital": k,
        "hospital_linkage_trials": replay["firewall"]["num_patients"],
        "hospital_linkage_top1_firewall": replay["firewall"]["top1"],
        "hospital_linkage_top1_firewall_ci95": replay["firewall"]["top1_ci95"],
        "hospital_linkage_auc_firewall": replay["firewall"]["auc"],
        "hospital_linkage_top1_raw": replay["raw"]["top1"],
        "hospital_linkage_top1_firewall_no_replay": gradient["firewall"]["top1"],
        "hospital_linkage_chance": replay["firewall"]["chance_top1"],
    }
