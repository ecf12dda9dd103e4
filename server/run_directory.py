"""One directory per federated run: per-round checkpoints and metrics, the
convergence plot, the final model and the resolved config (no Flower in here).

    <paths.runs>/<YYYYmmdd-HHMMSS>-<run id>/
        config.yaml          the resolved configuration
        metrics.json         {"rounds": [{round, global_dice, global_iou, train_loss, client_dice, ...}, ...]}
        metrics.csv          the same rounds as a table
        convergence.png      global Dice/IoU on original identities, client Dice and train loss per round
        checkpoint.pt        the global model after the last finished round (atomic; resume from it)
        model.safetensors    the final global model (+ model.json: how to rebuild it)

Each round records ``seconds`` (that round alone; round 0: set-up and the first
scoring) and ``seconds_total`` (since the start), and which hospitals, by Flower
node id, trained, failed, never replied (``hospitals_missed``) or were not ready.

Everything here is numbers, node ids and the global model: nothing from a
hospital but its aggregated metrics.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from skinfed.config import RunConfig as Config

COLUMNS = (
    "round", "global_dice", "global_iou", "global_loss", "train_loss", "client_dice", "client_iou",
    "clients_trained", "clients_failed", "train_examples", "firewall_accepted", "firewall_refused", "seconds",
    "seconds_total", "clients_missed", "clients_not_ready", "hospitals_trained", "hospitals_failed",
    "hospitals_missed", "hospitals_not_ready", "clients_over_budget", "epsilon",
)
#: Per-round lists of hospital node ids (ids only): which trained, whose ClientApp
#: failed, which never replied, and whose firewall was not ready (with its counts).
HOSPITAL_LISTS = ("hospitals_trained", "hospitals_failed", "hospitals_missed", "hospitals_not_ready")
#: Per-round patient-level DP (skinfed.patient_privacy.round_summary), when the run has it.
PRIVACY_KEYS = ("epsilon", "dp_accounting", "hospitals_epsilon", "hospitals_dp_budget_spent")


def _csv_ids(value) -> str | None:
    """A list of node ids (or not-ready records) as one CSV cell: ids separated by spaces."""
    if value is None:
        return None
    return " ".join(str(v["id"]) if isinstance(v, dict) else str(v) for v in value)


class ResumeError(ValueError):
    """federation.resume names nothing that can be resumed."""


@dataclass
class RunDirectory:
    path: Path
    rounds: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    offset: int = 0  # rounds already done before this process (resume)
    last_recorded: float = field(default_factory=time.time)  # when the previous round was recorded

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: Config, run_id: int | str) -> RunDirectory:
        """A fresh run directory, or the one ``federation.resume`` names."""
        root = Path(cfg.paths.runs).expanduser()
        if cfg.federation.resume:
            run = cls.open_existing(root, cfg.federation.resume)
        else:
            path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path)
        from omegaconf import OmegaConf

        atomic_write_text(run.path / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())))
        return run

    @classmethod
    def open_existing(cls, root: Path, resume: str) -> RunDirectory:
        if resume == "latest":
            candidates = sorted((p for p in root.glob("*/checkpoint.pt")), key=lambda p: p.stat().st_mtime)
            unfinished = [p.parent for p in candidates if not (p.parent / "model.safetensors").exists()]
            if not unfinished:
                raise ResumeError(f"federation.resume=latest: no unfinished run with a checkpoint under {root}")
            path = unfinished[-1]
        else:
            path = Path(resume).expanduser()
            if not (path / "checkpoint.pt").is_file():
                raise ResumeError(f"federation.resume={resume}: {path} has no checkpoint.pt to resume from")
        metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
        checkpoint = torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=True)
        run = cls(path, rounds=metrics.get("rounds", []), offset=int(checkpoint["round"]))
        run.rounds = [r for r in run.rounds if r["round"] <= run.offset]
        if run.rounds:  # seconds_total goes on from the last recorded round (older runs: seconds was the total)
            last = run.rounds[-1]
            run.started -= float(last.get("seconds_total", last.get("seconds")) or 0.0)
        return run

    def checkpoint_state(self) -> dict[str, torch.Tensor] | None:
        """The global model of the last finished round, if resuming."""
        if not self.offset:
            return None
        return torch.load(self.path / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]

    # -- per round ------------------------------------------------------------------------
    def record_round(self, server_round: int, global_metrics: dict[str, float], train: dict[str, float],
                     evaluate: dict[str, float], state_dict: dict[str, torch.Tensor]) -> dict:
        """Checkpoint the global model and append the round's record (all atomic)."""
        record = {
            "round": server_round,
            "global_dice": global_metrics.get("dice"),
            "global_iou": global_metrics.get("iou"),
            "global_loss": global_metrics.get("loss"),
            "train_loss": train.get("train_loss"),
            "client_dice": evaluate.get("dice"),
            "client_iou": evaluate.get("iou"),
            "clients_trained": train.get("clients_trained"),
            "clients_failed": train.get("clients_failed"),
            "train_examples": train.get("num-examples"),
            "firewall_accepted": train.get("firewall_accepted"),
            "firewall_refused": train.get("firewall_refused"),
            "clients_missed": train.get("clients_missed"),
            "clients_not_ready": train.get("clients_not_ready"),
            "clients_over_budget": train.get("clients_over_budget"),
            **{key: train.get(key) for key in HOSPITAL_LISTS},
            # Patient-level DP: the largest epsilon over the hospitals and that hospital's accounting.
            **{key: train[key] for key in PRIVACY_KEYS if key in train},
        }
        now = time.time()
        record["seconds"] = round(now - self.last_recorded, 2)  # this round (round 0: set-up and first scoring)
        record["seconds_total"] = round(now - self.started, 2)
        self.last_recorded = now
        record = {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        self.rounds = [r for r in self.rounds if r["round"] != server_round] + [record]
        atomic_torch_save(self.path / "checkpoint.pt", {"round": server_round, "state_dict": state_dict})
        self.write_metrics()
        return record

    def write_metrics(self) -> None:
        atomic_write_json(self.path / "metrics.json", {"rounds": self.rounds})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{**r, **{k: _csv_ids(r.get(k)) for k in HOSPITAL_LISTS}} for r in self.rounds])
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key: str) -> tuple[list, list]:
            pts = [(r["round"], r[key]) for r in self.rounds if r.get(key) is not None]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, label in (("global_dice", "global Dice (original identities)"), ("global_iou", "global IoU (original identities)"),
                           ("client_dice", "client Dice (local surrogates)")):
            x, y = series(key)
            if x:
                ax1.plot(x, y, marker="o", label=label)
        ax1.set_xlabel("round")
        ax1.set_ylim(0, 1)
        ax1.set_title("segmentation quality")
        ax1.legend(fontsize=8)
        x, y = series("train_loss")
        if x:
            ax2.plot(x, y, marker="o", color="tab:red")
        ax2.set_xlabel("round")
        ax2.set_title("mean client train loss (Dice + BCE)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(self.path / "convergence.png", buf.getvalue())

    # -- the end ------------------------------------------------------------------------
    def finish(self, state_dict: dict[str, torch.Tensor], cfg: Config) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        atomic_write_bytes(self.path / "model.safetensors", save(tensors))
        atomic_write_json(self.path / "model.json", {
            "model": cfg.to_dict()["model"], "rounds": len(self.rounds) - (1 if self.rounds and self.rounds[0]["round"] == 0 else 0),
            "load": "models.segmentation.build_model(ModelConfig(**model)); load_state_dict(safetensors.torch.load_file(...))",
        })
