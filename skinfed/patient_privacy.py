"""Patient-level differential privacy of a federated run (``federation.dp.mode=patient``).

Each hospital trains with DP-SGD (:mod:`models.private_training`, Opacus) and
keeps a *ledger* of every round it trained in its private node folder, next to
its secret keys (``<node>/secrets/patient_dp.json``, written atomically before
the update leaves the hospital). Epsilon is always composed over the whole
ledger of the run, so a restarted hospital or a resumed run goes on counting.
The ledger is keyed by the run directory's name (the server sends it; a resumed
run keeps it), so separate experiments on the same hospital are each accounted
over their own rounds; the hospital's log also states the epsilon composed over
all runs it ever trained in.

What goes to the server is the DP-SGD update and numbers that say nothing more
about a patient: epsilon, the accounting parameters
(sampling rate, noise multiplier, steps, delta, an accountant code), or, from a
hospital whose next round would pass its budget, no update and a typed
refusal (:class:`skinfed.hospital_replies.BudgetSpent`: its epsilon and the
budget). The server keeps, per round, the largest epsilon over the hospitals and
that hospital's accounting (``metrics.json``), the hospitals that stopped for
their budget (its strategy's round accounting), and the run's per-hospital
epsilons and budget stops (``privacy.json``).

delta: ``federation.dp.delta``, capped at 1 / (the hospital's training pairs),
the smallest over the run's rounds (so one delta holds for the whole ledger).

Outside the guarantee: the training loss is not sent (NaN; the hospital's log
keeps it); the count of training pairs is treated as public, as in DP-SGD; the
client-side evaluation on the hospital's *validation* pairs (which are never
trained on) is released as usual; ``federation.fraction_evaluate=0`` stops it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from common.io import atomic_write_json
from models import private_training
from models.private_training import HistoryEntry

log = logging.getLogger("skinfed.privacy")

LEDGER_NAME = "patient_dp.json"  # under <node>/secrets/
LEDGER_FORMAT = 1
#: A MetricRecord holds numbers only: the accountant travels as a code.
ACCOUNTANT_CODES = {"rdp": 1}
ACCOUNTANT_NAMES = {code: name for name, code in ACCOUNTANT_CODES.items()}
#: The ledger of a round whose train message names no run (skinfed.round_config.DP_RUN).
DEFAULT_RUN_KEY = "default"
RUN_SUMMARY_NAME = "privacy.json"


class PrivacyBudgetSpent(RuntimeError):
    """This hospital's next round would take its epsilon past its budget
    (``federation.dp.max_epsilon``, or a ``target_epsilon`` no noise can keep):
    ``epsilon`` spent so far in this run, ``budget`` the limit. The text is for the
    hospital's log; the server gets the numbers (a BudgetSpent reply)."""

    def __init__(self, message: str, *, epsilon: float, budget: float) -> None:
        super().__init__(message)
        self.epsilon = float(epsilon)
        self.budget = float(budget)


# ----------------------------------------------------------------------------- the model
def is_patient_dp(cfg: Any) -> bool:
    return cfg.federation.dp.mode == "patient"


def build_federated_model(cfg: Any) -> nn.Module:
    """The run's global U-Net: ``model``'s, with GroupNorm instead of BatchNorm
    under patient-level DP (server and hospitals must build the same one)."""
    from models import segmentation

    model = segmentation.build_model(cfg.model)
    return private_training.make_private_compatible(model) if is_patient_dp(cfg) else model


# ----------------------------------------------------------------------------- the ledger
@dataclass
class PrivacyLedger:
    """One hospital's accounting of one run: every round it trained, in order."""

    path: Path
    run: str
    rounds: list[dict[str, float]] = field(default_factory=list)  # noise_multiplier, sample_rate, steps, delta
    calibration: dict[str, float] | None = None  # the noise computed for target_epsilon, and for what
    other_runs: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, node: str | Path, run: str) -> PrivacyLedger:
        """The ledger of ``run`` in the node folder ``node`` (empty when new)."""
        path = Path(node) / "secrets" / LEDGER_NAME
        runs: dict[str, dict] = {}
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("format") != LEDGER_FORMAT or stored.get("accountant") != private_training.ACCOUNTANT:
                raise ValueError(f"{path.name}: unknown ledger format; it was not written by this version")
            runs = dict(stored.get("runs", {}))
        mine = runs.pop(run, {})
        return cls(path, run, list(mine.get("rounds", [])), mine.get("calibration"), runs)

    @property
    def history(self) -> list[HistoryEntry]:
        return [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in self.rounds]

    @property
    def delta(self) -> float | None:
        return min((float(r["delta"]) for r in self.rounds), default=None)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of the run so far at ``delta`` (default the ledger's)."""
        delta = delta if delta is not None else self.delta
        return private_training.epsilon_of(self.history, delta) if self.rounds else 0.0

    def epsilon_all_runs(self, delta: float) -> float:
        """Epsilon of every round this hospital trained in, over all runs, at ``delta``."""
        history = [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"]))
                   for run in self.other_runs.values() for r in run.get("rounds", [])] + self.history
        return private_training.epsilon_of(history, delta)

    def record(self, done: private_training.PrivateRound, delta: float) -> None:
        """Add a trained round and write the ledger (atomic) before the update is sent."""
        self.rounds.append({"noise_multiplier": done.noise_multiplier, "sample_rate": done.sample_rate,
                            "steps": done.steps, "delta": delta})
        self.save()

    def save(self) -> None:
        runs = {**self.other_runs, self.run: {"rounds": self.rounds, "calibration": self.calibration}}
        atomic_write_json(self.path, {"format": LEDGER_FORMAT, "accountant": private_training.ACCOUNTANT,
                                      "runs": runs})


# ----------------------------------------------------------------------------- one round at a hospital
def delta_for(configured: float, num_examples: int) -> float:
    """``federation.dp.delta``, capped at 1 / the hospital's training pairs."""
    return min(float(configured), 1.0 / max(num_examples, 1))


def noise_for_round(dp: Any, ledger: PrivacyLedger, sample_rate: float, steps: int, planned_rounds: int,
                    delta: float) -> float:
    """``federation.dp.noise_multiplier``, or with ``target_epsilon`` the noise that
    spends it over the rounds still planned (computed once per run and kept in the
    ledger, again only if the hospital's sampling rate or steps change)."""
    if dp.target_epsilon is None:
        return float(dp.noise_multiplier)
    plan = ledger.calibration
    if plan and plan["sample_rate"] == sample_rate and plan["steps"] == steps and plan["delta"] == delta \
            and plan["target_epsilon"] == dp.target_epsilon:
        return float(plan["noise_multiplier"])
    rounds_left = max(1, planned_rounds - len(ledger.rounds))
    try:
        z = private_training.calibrate_noise(float(dp.target_epsilon), delta, ledger.history, sample_rate,
                                             steps * rounds_left)
    except ValueError as exc:
        log.warning("this hospital refuses to train: no noise keeps federation.dp.target_epsilon=%s (%s)",
                    dp.target_epsilon, exc)
        spent = ledger.epsilon(delta)
        raise PrivacyBudgetSpent(f"privacy budget spent: no noise keeps federation.dp.target_epsilon="
                                 f"{dp.target_epsilon} over the rounds left ({exc}; spent {spent:.4f})",
                                 epsilon=spent, budget=float(dp.target_epsilon)) from None
    ledger.calibration = {"noise_multiplier": z, "sample_rate": sample_rate, "steps": steps, "delta": delta,
                          "target_epsilon": float(dp.target_epsilon), "rounds": rounds_left}
    return z


def train_round(model: nn.Module, pairs: list, cfg: Any, node: str | Path, run: str, *, seed: int,
                epochs: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """One round of DP-SGD at a hospital, ``epochs`` local epochs (the server's
    round plan; default ``model.local_epochs``), accounted in its ledger. Returns
    ``train_loss``, ``num_examples`` and ``metrics`` (numbers for the server);
    raises :class:`PrivacyBudgetSpent` (and trains nothing) when the round would
    pass ``federation.dp.max_epsilon``."""
    dp, model_cfg = cfg.federation.dp, cfg.model
    epochs = model_cfg.local_epochs if epochs is None else int(epochs)
    ledger = PrivacyLedger.load(node, run or DEFAULT_RUN_KEY)
    n = len(pairs)
    delta = min(delta_for(dp.delta, n), ledger.delta or 1.0)
    sample_rate = private_training.sample_rate_for(n, model_cfg.batch_size)
    steps = private_training.steps_per_round(n, model_cfg.batch_size, epochs)
    noise = noise_for_round(dp, ledger, sample_rate, steps, cfg.federation.num_rounds, delta)
    spent = ledger.epsilon(delta)
    projected = private_training.epsilon_of([*ledger.history, (noise, sample_rate, steps)], delta)
    if dp.max_epsilon is not None and projected > dp.max_epsilon:
        message = (f"privacy budget spent: epsilon {projected:.4f} after this round would pass "
                   f"federation.dp.max_epsilon={dp.max_epsilon} (rounds trained {len(ledger.rounds)}, "
                   f"spent {spent:.4f})")
        log.warning("this hospital refuses to train: %s", message)
        raise PrivacyBudgetSpent(message, epsilon=spent, budget=float(dp.max_epsilon))
    done = private_training.train_private(model, pairs, model_cfg, noise_multiplier=noise,
                                          max_grad_norm=dp.max_grad_norm, epochs=epochs, device=device, seed=seed)
    ledger.record(done, delta)
    epsilon = ledger.epsilon(delta)
    history = ledger.history
    log.info("patient-level DP: epsilon %.3f at delta %.3g after %d round(s) of this run (%.3f over all runs here); "
             "local train loss %.4f", epsilon, delta, len(history), ledger.epsilon_all_runs(delta), done.train_loss)
    return {
        # The training loss is a statistic of the training pairs outside the DP-SGD
        # guarantee: it stays in the hospital's log, the server gets NaN.
        "train_loss": float("nan"),
        "num_examples": done.num_examples,
        "metrics": accounting_metrics(history, delta, epsilon),
    }


def accounting_metrics(history: list[HistoryEntry], delta: float, epsilon: float) -> dict[str, float | int]:
    """The scalars a hospital reports: with one (noise, rate) over the run, they
    are enough to recompute epsilon (``dp_uniform`` says whether that holds)."""
    noise, rate, _ = history[-1]
    return {
        "epsilon": float(epsilon),
        "dp_noise_multiplier": float(noise),
        "dp_sampling_rate": float(rate),
        "dp_steps": int(sum(s for _, _, s in history)),
        "dp_delta": float(delta),
        "dp_rounds": len(history),
        "dp_uniform": int(len({(z, q) for z, q, _ in history}) == 1),
        "dp_accountant": ACCOUNTANT_CODES[private_training.ACCOUNTANT],
    }


# ----------------------------------------------------------------------------- the server's view
def round_summary(replies: Iterable[Any]) -> dict[str, Any]:
    """From one round's train replies (Flower Messages): ``epsilon`` (the largest
    over the hospitals that trained), ``dp_accounting`` (that hospital's) and each
    hospital's epsilon by node id. Empty when no hospital reports patient-level
    DP. (The hospitals that refused for their budget are the strategy's round
    accounting: server/strategy.py.)"""
    per_hospital: dict[int, dict[str, Any]] = {}
    for reply in replies:
        if reply.has_error():
            continue
        metrics = next(iter(reply.content.metric_records.values()), {})
        if "epsilon" in metrics and "dp_accountant" in metrics:
            node = int(reply.metadata.src_node_id)
            per_hospital[node] = {k: metrics[k] for k in metrics if k == "epsilon" or k.startswith("dp_")}
    if not per_hospital:
        return {}
    node, worst = max(per_hospital.items(), key=lambda item: float(item[1]["epsilon"]))
    return {
        "epsilon": float(worst["epsilon"]),
        "dp_accounting": {
            "hospital": node,
            "sampling_rate": float(worst["dp_sampling_rate"]),
            "noise_multiplier": float(worst["dp_noise_multiplier"]),
            "steps": int(worst["dp_steps"]),
            "delta": float(worst["dp_delta"]),
            "rounds": int(worst["dp_rounds"]),
            "uniform": bool(worst["dp_uniform"]),
            "accountant": ACCOUNTANT_NAMES.get(int(worst["dp_accountant"]), "unknown"),
        },
        "hospitals_epsilon": {str(k): float(v["epsilon"]) for k, v in sorted(per_hospital.items())},
    }


def write_run_summary(run_dir: str | Path, rounds: list[dict]) -> dict[str, Any] | None:
    """``privacy.json`` of a run from its recorded rounds: each hospital's latest
    epsilon, the run's largest, and its accounting (None when the run has no
    patient-level DP)."""
    latest: dict[str, float] = {}
    worst: dict[str, Any] | None = None
    refused: dict[str, int] = {}
    for record in sorted(rounds, key=lambda r: r["round"]):
        latest.update(record.get("hospitals_epsilon") or {})
        for entry in record.get("hospitals_dp_budget_spent") or []:
            refused.setdefault(str(entry["id"]), record["round"])
        if record.get("epsilon") is not None and (worst is None or record["epsilon"] >= worst["epsilon"]):
            worst = {"epsilon": record["epsilon"], "round": record["round"], "dp_accounting": record.get("dp_accounting")}
    if worst is None and not refused:
        return None
    summary = {
        "guarantee": "patient-level (epsilon, delta)-DP of each hospital's updates (DP-SGD, add-or-remove one "
                     "training pair), composed over every round the hospital trained in this run",
        "accountant": private_training.ACCOUNTANT,
        "epsilon": None if worst is None else worst["epsilon"],
        "epsilon_round": None if worst is None else worst["round"],
        "dp_accounting": None if worst is None else worst["dp_accounting"],
        "hospitals_epsilon": latest,
        "hospitals_dp_budget_spent_from_round": refused,
    }
    atomic_write_json(Path(run_dir) / RUN_SUMMARY_NAME, summary)
    return summary


def summary_line(summary: dict[str, Any] | None) -> str | None:
    """The run summary's line for the person watching: the run's epsilon, and the
    hospitals (node ids) that stopped for their budget, from which round."""
    if not summary:
        return None
    refused = summary.get("hospitals_dp_budget_spent_from_round") or {}
    stopped = ("; budget spent at hospital(s) " + ", ".join(f"{node} (from round {r})" for node, r in refused.items())
               if refused else "")
    if summary.get("epsilon") is None:
        return f"patient-level DP: no hospital trained{stopped}" if refused else None
    acc = summary["dp_accounting"] or {}
    return (f"patient-level DP: epsilon {summary['epsilon']:.2f} at delta {acc.get('delta', math.nan):.3g} (largest over "
            f"{len(summary['hospitals_epsilon'])} hospital(s), {acc.get('accountant')} accountant, noise multiplier "
            f"{acc.get('noise_multiplier', math.nan):.3f}, sampling rate {acc.get('sampling_rate', math.nan):.3f}, "
            f"{acc.get('steps')} steps){stopped}")
