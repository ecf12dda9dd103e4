"""Train the embedded flow model (and its attribute classifier) on the synthetic clinic.

    python -m scripts.train_embedded flow --out runs/embedded --steps 20000
    python -m scripts.train_embedded flow --out runs/embedded-v2 --init-from models/embedded --steps 6000
    python -m scripts.train_embedded flow --out runs/embedded-v2 --init-from models/embedded --pool 20000 --workers 14 --batch 256 --lr 5e-4 --bf16 --schedule cosine --minutes 4.3 --steps 1000000
        (the shipped version 2: one GPU, 4.3 minutes)
    python -m scripts.train_embedded classifier --out runs/embedded
    python -m scripts.train_embedded export --out runs/embedded   # -> models/embedded/

Deterministic by seed and resumable: a checkpoint (model, EMA, optimiser, data
order, loss history) is written atomically every ``--checkpoint-every`` steps and
a killed run continues from it. A loss-curve PNG is redrawn at each checkpoint.
Runs on CPU or CUDA (``--device``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.io import atomic_torch_save, atomic_write_json
from common.seeds import HELD_OUT_CLINIC_SEED
from models.attribute_classifier import HEADS, AttributeClassifier, save_classifier, subject_labels
from models.flow_unet import ATTRIBUTE_SLOTS, FlowUNet, FlowUNetConfig, load_flow_unet, save_flow_unet
from synthetic_clinic import render_subject
from synthetic_clinic.render import Subject

#: The clinic seed the embedded model is trained on; evaluation uses other seeds.
TRAIN_CLINIC_SEED = 12345
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "models" / "embedded"


def attribute_phrases(s: Subject) -> list[str]:
    view = "periocular close-up" if s.view == "periocular" else "full face"
    phrases = [f"{s.skin_tone_group} skin", f"{s.hair_colour} hair", f"{s.ear_group} ears", f"{s.brow_group} brows", view]
    phrases.append("long hair" if s.hair_length > 0.5 else "short hair")
    if s.beard > 0.3:
        phrases.append("beard")
    return phrases


def subject_slots(s: Subject) -> list[int]:
    """The version-2 caption of a clinic subject as slot values (1-based; see
    models.flow_unet.ATTRIBUTE_SLOTS), binned exactly as the attribute judge's
    ground truth (``models.attribute_classifier.subject_labels``). ``state`` is
    left unspecified: the image kind decides it."""
    labels = subject_labels(s)
    value = {name: ATTRIBUTE_SLOTS[name].index(labels[name]) + 1 for name in ATTRIBUTE_SLOTS
             if name in labels and name not in ("sex", "view")}
    value.update({
        "sex": 1 if s.sex == "female" else 2,
        "state": 0,
        "skin": ("light", "medium", "dark").index(s.skin_tone_group) + 1,
        "view": 2 if s.view == "periocular" else 1,
    })
    return [value[name] for name in ATTRIBUTE_SLOTS]


def _render_rows(indices: list[int], size: int) -> list[dict]:
    """One chunk of the training pool (run in worker processes)."""
    rows = []
    for i in indices:
        cs = render_subject(TRAIN_CLINIC_SEED, i, size)
        rows.append({
            "images": np.stack([cs.pathological, cs.healthy, cs.opposite]),
            "masks": np.stack([cs.mask, cs.opposite_mask]),
            "slots": [subject_slots(cs.subject), subject_slots(cs.subject.with_opposite_sex())],
            "phrases": "|".join(attribute_phrases(cs.subject)),
            "sex": HEADS["sex"].index(cs.subject.sex),
            "tone": HEADS["skin_tone_group"].index(cs.subject.skin_tone_group),
            "view": HEADS["view"].index(cs.subject.view),
        })
    return rows


def build_pool(n_subjects: int, size: int, cache: Path, workers: int = 1) -> dict[str, np.ndarray]:
    """Render (or load) the training pool: per subject its pathological image,
    healthy twin and opposite-sex image with their erythema masks, plus the
    attributes the captions use (phrases for version 1, slots for version 2)."""
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        if int(data["images"].shape[0]) == n_subjects and int(data["images"].shape[2]) == size and "slots" in data.files:
            return {k: data[k] for k in data.files}
    images = np.zeros((n_subjects, 3, size, size, 3), np.uint8)
    masks = np.zeros((n_subjects, 2, size, size), bool)  # pathological, opposite
    slots = np.zeros((n_subjects, 2, len(ATTRIBUTE_SLOTS)), np.int64)  # subject, opposite-sex subject
    phrases: list[str] = []
    sexes = np.zeros(n_subjects, np.int64)
    tones = np.zeros(n_subjects, np.int64)
    views = np.zeros(n_subjects, np.int64)
    chunks = [list(range(s, min(s + 250, n_subjects))) for s in range(0, n_subjects, 250)]
    bar = tqdm(total=n_subjects, desc="render training pool", unit="subject", mininterval=5)
    if workers > 1:
        # spawn, not fork: the parent may already hold a CUDA context.
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        rendered = executor.map(_render_rows, chunks, [size] * len(chunks))
    else:
        executor, rendered = None, map(_render_rows, chunks, [size] * len(chunks))
    for chunk, rows in zip(chunks, rendered):
        for i, row in zip(chunk, rows):
            images[i], masks[i], slots[i] = row["images"], row["masks"], row["slots"]
            phrases.append(row["phrases"])
            sexes[i], tones[i], views[i] = row["sex"], row["tone"], row["view"]
        bar.update(len(chunk))
    bar.close()
    if executor is not None:
        executor.shutdown()
    pool = {"images": images, "masks": masks, "slots": slots, "phrases": np.array(phrases), "sex": sexes,
            "tone": tones, "view": views}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".partial.npz")
    np.savez(tmp, **pool)
    tmp.replace(cache)
    return pool


def sample_captions(pool: dict, idx: np.ndarray, kinds: np.ndarray, rng: np.random.Generator, p_drop: float) -> list[str]:
    """Captions with random attribute dropout, so short prompts work at inference."""
    captions = []
    for i, kind in zip(idx, kinds):
        if rng.random() < p_drop:
            captions.append("")
            continue
        female = pool["sex"][i] == 0
        if kind == 2:  # the opposite-sex image
            female = not female
        person = "woman" if female else "man"
        if rng.random() < 0.15:
            person = "person"
        state = "with clear, healthy skin" if kind == 1 else "with facial erythema"
        phrases = [p for p in str(pool["phrases"][i]).split("|") if rng.random() < 0.5]
        if kind == 2:
            phrases = [p for p in phrases if p not in ("beard", "long hair", "short hair")]
        captions.append(", ".join([f"photo of a {person} {state}", *phrases]))
    return captions


def sample_slot_conditions(pool: dict, idx: np.ndarray, kinds: np.ndarray, rng: np.random.Generator,
                           size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Version-2 conditions: slot values with per-slot dropout (so any subset of
    attributes can be asked for) and the erythema map, known or not.

    kind 0: pathological (its mask), 1: healthy twin (an empty map), 2: opposite sex."""
    n_slots = len(ATTRIBUTE_SLOTS)
    state = list(ATTRIBUTE_SLOTS).index("state")
    sex = list(ATTRIBUTE_SLOTS).index("sex")
    batch = len(idx)
    opposite = (kinds == 2).astype(np.int64)
    values = pool["slots"][idx, opposite].copy()  # (batch, n_slots)
    values[:, state] = np.where(kinds == 1, 2, 1)
    values[rng.random(batch) < 0.15, sex] = 3  # "person"
    keep = rng.random((batch, n_slots)) >= 0.3
    keep[:, state] |= rng.random(batch) < 0.5  # the state is named more often than the rest
    values = np.where(keep, values, 0)
    drop_all = rng.random(batch) < 0.1
    values[drop_all] = 0
    spatial = np.zeros((batch, 2, size, size), np.float32)
    known = rng.random(batch) < np.where(drop_all, 0.15, 0.6)  # the map is known
    spatial[known, 1] = 1.0
    with_map = known & (kinds != 1)  # a healthy twin's known map is empty
    spatial[with_map, 0] = pool["masks"][idx[with_map], opposite[with_map]]
    return torch.from_numpy(values), torch.from_numpy(spatial)


def plot_losses(history: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps, losses = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="batch")
    k = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="velocity MSE", yscale="log", title="embedded flow model: training loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def train_flow(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    pool = build_pool(args.pool, args.size, out / f"pool_{args.pool}_{args.size}.npz", args.workers)
    # (N, 3, H, W, 3) uint8; on a GPU the whole pool lives there (0.7 GB for 20k subjects).
    images = torch.from_numpy(pool["images"]).to(device if device.type == "cuda" else "cpu")

    slots = args.conditioning == "attribute_slots"
    config = FlowUNetConfig(image_size=args.size, channels=tuple(args.channels), conditioning=args.conditioning,
                            spatial_channels=2 if slots else 0)
    torch.manual_seed(args.seed)
    model = FlowUNet(config).to(device)
    if args.init_from and not (out / "checkpoint.pt").exists():
        warm_start(model, load_flow_unet(args.init_from))
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4, fused=device.type == "cuda")
    rng = np.random.default_rng(args.seed)
    step, history, seconds = 0, [], 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        step, history, seconds = state["step"], state["history"], state.get("seconds", 0.0)
        print(f"resumed from step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"FlowUNet: {n_params / 1e6:.2f} M parameters, device {device}, {args.threads} threads")

    def save() -> None:
        atomic_torch_save(ckpt, {
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "rng": rng.bit_generator.state, "step": step,
            "history": history, "seconds": seconds, "args": vars(args),
        })
        save_flow_unet(ema, out)
        atomic_write_json(out / "training.json", {
            "steps": step, "wall_seconds": round(seconds), "final_loss": float(np.mean([h[1] for h in history[-200:]])),
            "parameters": n_params, "args": vars(args), "device": str(device),
        })
        plot_losses(history, out / "loss_curve.png")

    bar = tqdm(total=args.steps, initial=step, desc="train flow", unit="step", mininterval=10)
    started = time.time()
    pending: list[tuple[int, torch.Tensor]] = []
    while step < args.steps:
        if args.minutes and time.time() - started > 60 * args.minutes:
            print(f"time budget of {args.minutes} min reached at step {step}")
            break
        t0 = time.time()
        idx = rng.integers(0, images.shape[0], size=args.batch)
        kinds = rng.integers(0, 3, size=args.batch)
        pick = (torch.from_numpy(idx).to(images.device), torch.from_numpy(kinds).to(images.device))
        x0 = images[pick].permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
        spatial = None
        if slots:
            tokens, spatial = sample_slot_conditions(pool, idx, kinds, rng, args.size)
            tokens, spatial = tokens.to(device), spatial.to(device)
        else:
            tokens = model.caption_tokens(sample_captions(pool, idx, kinds, rng, p_drop=0.1))
        # Noise from a generator seeded by (seed, step) on the training device: a
        # resumed run draws what the uninterrupted one would have, without host copies.
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.sigmoid(torch.randn(args.batch, generator=gen, device=device))  # logit-normal
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        lr = args.lr * min(1.0, (step + 1) / 500)  # warm-up
        if args.schedule == "cosine":
            # Progress by steps or, under a time budget, by the clock, whichever is further.
            done = step / args.steps
            if args.minutes:
                done = max(done, (time.time() - started) / (60 * args.minutes))
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(xt, t, model.encode_captions(tokens), spatial)
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        seconds += time.time() - t0
        pending.append((step, loss.detach()))
        bar.update(1)
        if step % 50 == 0 or step % args.checkpoint_every == 0 or step == args.steps:
            # Read losses back in groups: a per-step .item() would stall a GPU.
            history.extend((k, float(v)) for k, v in zip([k for k, _ in pending], torch.stack([v for _, v in pending]).cpu()))
            pending.clear()
            bar.set_postfix(loss=f"{np.mean([h[1] for h in history[-100:]]):.4f}", refresh=False)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save()
    bar.close()
    if pending:
        history.extend((k, float(v)) for k, v in pending)
    save()
    print(json.dumps({"steps": step, "loss": float(np.mean([h[1] for h in history[-200:]])), "out": str(out)}))


def warm_start(model: FlowUNet, source: FlowUNet) -> None:
    """Start from a trained model's image prior: copy every weight of the same
    shape; the stem's extra (erythema map) inputs start at zero, so the warm
    model first behaves as if the map were absent."""
    own = model.state_dict()
    copied = 0
    for name, value in source.state_dict().items():
        if name in own and own[name].shape == value.shape:
            own[name] = value.clone()
            copied += 1
        elif name == "stem.weight" and own[name].shape[1] > value.shape[1]:
            # pixel_unshuffle puts the 3 image channels' 12 planes first.
            own[name].zero_()
            own[name][:, : value.shape[1]] = value
            copied += 1
    model.load_state_dict(own)
    print(f"warm start: {copied} of {len(own)} tensors from the previous model")


def train_classifier(args: argparse.Namespace) -> None:
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    pool = build_pool(args.pool, args.size, out / f"pool_{args.pool}_{args.size}.npz", args.workers)
    images = torch.from_numpy(pool["images"])
    n = images.shape[0]
    n_val = max(64, n // 20)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def labels(idx: np.ndarray, kinds: np.ndarray) -> dict[str, torch.Tensor]:
        sex = pool["sex"][idx] ^ (kinds == 2)
        return {
            "sex": torch.from_numpy(sex.astype(np.int64)),
            "erythema": torch.from_numpy((kinds != 1).astype(np.int64)),
            "skin_tone_group": torch.from_numpy(pool["tone"][idx]),
            "view": torch.from_numpy(pool["view"][idx]),
        }

    def batch(idx: np.ndarray, kinds: np.ndarray) -> torch.Tensor:
        x = images[torch.from_numpy(idx), torch.from_numpy(kinds)].permute(0, 3, 1, 2).float() / 255
        return x

    for _ in tqdm(range(args.classifier_steps), desc="train attribute classifier", unit="step"):
        idx = rng.integers(n_val, n, size=64)
        kinds = rng.integers(0, 3, size=64)
        x = batch(idx, kinds)
        # Light noise and blur so the judge also reads generated (imperfect) images.
        x = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
        logits = model(x)
        y = labels(idx, kinds)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    idx = np.repeat(np.arange(n_val), 3)
    kinds = np.tile(np.arange(3), n_val)
    with torch.no_grad():
        logits = model(batch(idx, kinds))
    y = labels(idx, kinds)
    acc = {k: float((logits[k].argmax(1) == y[k]).float().mean()) for k in HEADS}
    print("held-out accuracy:", json.dumps(acc))
    save_classifier(model, out, {"held_out_accuracy": acc, "held_out_images": int(len(idx))})


def export(args: argparse.Namespace) -> None:
    """Copy the trained weights into models/embedded/ (what the package ships) and
    calibrate the out-of-distribution threshold of the exported model on held-out
    clinic faces (seed 777; the training seed is never used for it)."""
    from common.io import atomic_write_json
    from privacy_firewall.backends.embedded import OOD_FILE, EmbeddedBackend, calibrate_out_of_distribution

    src = Path(args.out)
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("flow_unet.safetensors", "flow_unet.json", "attribute_classifier.safetensors",
                 "attribute_classifier.json", "training.json", "loss_curve.png"):
        if (src / name).exists():
            shutil.copyfile(src / name, EMBEDDED_DIR / name)
            print("exported", name)
    torch.set_num_threads(args.threads)
    backend = EmbeddedBackend(load_flow_unet(EMBEDDED_DIR), device=args.device, folder=None)
    images = []
    for i in range(args.ood_subjects):
        cs = render_subject(HELD_OUT_CLINIC_SEED, i, args.size)
        images += [cs.pathological, cs.healthy, cs.opposite]
    ood = calibrate_out_of_distribution(backend, images)
    atomic_write_json(EMBEDDED_DIR / OOD_FILE, ood)
    print("out-of-distribution threshold", json.dumps(ood))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("flow", "classifier", "export"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="runs/embedded")
        p.add_argument("--pool", type=int, default=12000, help="training subjects rendered once")
        p.add_argument("--size", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--workers", type=int, default=1, help="processes that render the training pool")
    flow = sub.choices["flow"]
    flow.add_argument("--steps", type=int, default=20000)
    flow.add_argument("--batch", type=int, default=32)
    flow.add_argument("--lr", type=float, default=1e-3)
    flow.add_argument("--ema", type=float, default=0.999)
    flow.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    flow.add_argument("--bf16", action="store_true", help="bf16 autocast (for GPUs; on CPUs without bf16 matrix units it is many times slower)")
    flow.add_argument("--checkpoint-every", type=int, default=250)
    flow.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                      help="learning rate after the warm-up (cosine: to zero at --steps or --minutes)")
    flow.add_argument("--minutes", type=float, default=None,
                      help="stop (and save) after this much wall time, e.g. to fit a GPU lease")
    flow.add_argument("--conditioning", choices=("bag_of_words", "attribute_slots"), default="attribute_slots")
    flow.add_argument("--init-from", default=None, help="warm start from this model folder (e.g. models/embedded)")
    sub.choices["classifier"].add_argument("--classifier-steps", type=int, default=1500)
    sub.choices["export"].add_argument("--ood-subjects", type=int, default=256,
                                       help="held-out subjects (x3 images) the out-of-distribution limit is set on")
    args = parser.parse_args(argv)
    {"flow": train_flow, "classifier": train_classifier, "export": export}[args.command](args)


if __name__ == "__main__":
    main()
