"""Hydra multirun sweeps over federated runs.

    python -m experiments.sweep -m firewall.flowedit.target_guidance=3,5,8 federation.num_hospitals=2,4
    python -m experiments.sweep -m federation.dirichlet_alpha=0.1,1,100 hydra.sweep.dir=multirun/skew

Every job composes the same ``conf/`` as `flwr run`, launches one federated
simulation through `flwr run` (skinfed-run, skinfed/launch.py, so the SuperNodes match
the job's hospitals) with its run directory inside the job's Hydra output folder,
and scores the firewall settings on ``sweep.eval_subjects`` held-out synthetic
subjects (mask IoU, identity flip rate). Jobs share the firewall cache, so jobs
that differ only in federation settings edit each image once, and equal firewall
settings are scored once. A failed job writes its error to ``result.json`` and
the sweep goes on. At the end the summary (experiments/sweep_summary.py) is written
into the sweep folder.

Per job: ``<sweep dir>/<job>/result.json``, ``federated.log``, ``runs/<run>/``,
``firewall_eval/``.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from common.config import conf_dir
from common.io import atomic_write_json

#: the sweep folder of the current multirun (set by the first job)
SWEEP_DIRS: list[Path] = []


def _parse(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def firewall_scores(cfg, job_dir: Path) -> dict:
    """The firewall's evaluation for this job's settings, computed once per settings."""
    from audit.evaluate import evaluate

    if cfg.sweep.eval_subjects == 0:
        return {}
    d = cfg.to_dict()
    key = hashlib.sha256(json.dumps([d["firewall"], d["sweep"]], sort_keys=True, default=str).encode()).hexdigest()[:20]
    cache = Path(cfg.paths.home).expanduser() / "sweep-evaluations" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    scores = evaluate(cfg.firewall, n=cfg.sweep.eval_subjects, out=job_dir / "firewall_eval",
                      clinic_seed=cfg.sweep.eval_clinic_seed, panels=4, progress=False)
    atomic_write_json(cache, scores)
    return scores


def run_job(job_dir: Path, overrides: list[str]) -> dict:
    """One sweep job: federated run + firewall scores -> ``job_dir/result.json``."""
    from common.config import split_overrides
    from skinfed import launch
    from skinfed.config import RUN_PARTS, load_run_config

    t0 = time.time()
    job_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"status": "failed", "overrides": dict(_parse(o) for o in overrides), "error": None}
    try:
        cfg = load_run_config(overrides)
        fw = firewall_scores(cfg, job_dir)
        result.update({k: fw.get(k) for k in ("iou_syn_gt", "iou_orig_syn", "identity_flip_rate",
                                              "erythema_kept_rate", "erythema_removed_rate")})
        log = job_dir / "federated.log"
        runs = job_dir / "runs"
        run_overrides, _ = split_overrides(overrides, RUN_PARTS)  # sweep.* are this job's, not the run's
        rc = launch.main([*run_overrides, f"paths.runs={runs}"], log_file=log)
        metrics = sorted(runs.glob("*/metrics.json"))
        if rc != 0 or not metrics:
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-8:] if log.exists() else []
            raise RuntimeError(f"the federated run did not finish (exit code {rc}): " + " | ".join(tail)[-800:])
        last = json.loads(metrics[-1].read_text())["rounds"][-1]
        result.update({
            "status": "ok", "run_dir": str(metrics[-1].parent),
            "global_dice": last.get("global_dice"), "global_iou": last.get("global_iou"),
            "client_dice": last.get("client_dice"), "rounds": last.get("round"),
        })
    except Exception as exc:  # the sweep goes on; the job says why it failed
        result["error"] = f"{type(exc).__name__}: {exc}"
        (job_dir / "error.txt").write_text(traceback.format_exc())
    result["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(job_dir / "result.json", result)
    return result


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def main(_cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        sweep_dir = Path(hc.sweep.dir)
        if sweep_dir not in SWEEP_DIRS:
            SWEEP_DIRS.append(sweep_dir)
    result = run_job(job_dir, list(hc.overrides.task))
    print(f"sweep job {hc.job.num if hc.job.num is not None else 0}: {result['status']}"
          f"{' - ' + result['error'] if result['error'] else ''} -> {job_dir}", flush=True)
    return result.get("global_dice")


if __name__ == "__main__":
    main()
    from experiments.sweep_summary import summarise

    for sweep_dir in SWEEP_DIRS:
        summarise(sweep_dir, sweep_dir)
