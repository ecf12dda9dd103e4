"""FlowEdit: inversion-free text-based editing with a pretrained flow model.

Kulikov et al., "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained
Flow Models" (arXiv 2412.08629), written once against :class:`FlowBackend`.

The idea in one paragraph. Instead of inverting the source image to noise and
regenerating it, FlowEdit integrates an ODE directly from the source latent
``x_src`` to the edit ``z_edit``. At each time ``t`` it noises the source with
fresh noise, ``z_src = (1 - t) x_src + t eps``, shifts that noisy source by the
edit so far, ``z_tar = z_edit + z_src - x_src``, and moves the edit along the
difference of the two velocities::

    dz_edit/dt = V_tar(z_tar, t) - V_src(z_src, t)

Only the last ``n_max`` of the ``T`` schedule steps are used: the higher n_max,
the stronger the edit. The last ``n_min`` steps switch to plain sampling of the
target (more freedom for fine detail). ``n_avg`` noise draws are averaged per step.

Guidance. ``cfg`` mode (the reference implementation) gives each branch its own
classifier-free guidance::

    V_src = v(z_src, "")  + s_src (v(z_src, src)  - v(z_src, ""))
    V_tar = v(z_tar, "")  + s_tar (v(z_tar, tgt)  - v(z_tar, ""))

``mixed`` mode is the paper's eq. (1), used as the target velocity of the ODE
above (the source branch keeps its CFG)::

    V_tar = v_u + g_src (v(z_tar, src) - v_u) + g_tgt (v(z_tar, tgt) - v_u),   v_u = v(z_tar, "")

so the target is pulled toward the new identity (g_tgt) while the source prompt
(g_src) anchors what both share, such as the erythema. With g_src = 0 it is the
``cfg`` target branch exactly.

Several targets at once. The healthy twin, the pathological surrogate and the
original identity's own healthy twin all edit the same source with the same
noise, so ``z_src`` and ``V_src`` are the same for all of them: the source branch
is evaluated once per step and shared. With true CFG a step costs 2 + 2k model
evaluations for k targets instead of 4k for k separate runs. The model is
guidance-distilled (FLUX.1-dev) -> 1 + k.

Erythema maps. A backend that takes a spatial erythema map (the embedded model,
version 2) can be given one per target (``target_maps``): the map conditions the
target branch (and is unknown in the unconditional and source branches), so
classifier-free guidance pushes the target toward "erythema exactly here". With
``n_max = n_min = steps`` FlowEdit is plain sampling of the target from noise:
that is how a new identity is drawn with nothing of the photo but its map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from privacy_firewall.backends.base import FlowBackend
from privacy_firewall.settings import FlowEditSettings

__all__ = ["FlowEditResult", "FlowEditSettings", "flowedit"]


@dataclass
class FlowEditResult:
    latents: torch.Tensor
    nfe_per_image: float


def flowedit(
    backend: FlowBackend,
    source_latents: torch.Tensor,
    source_prompts: list[str],
    target_prompts: list[list[str]],
    settings: FlowEditSettings,
    seeds: list[int],
    image_size: tuple[int, int] | None = None,
    max_batch: int = 64,
    progress: bool = False,
    target_maps: list[torch.Tensor | None] | None = None,
) -> FlowEditResult:
    """Edit each source latent toward each of its target prompts.

    Args:
        source_latents: (B, ...) latents of B source images.
        source_prompts: B prompts describing the sources.
        target_prompts: B lists of k prompts each (the same k for every image).
        seeds: one seed per image; the noise of image i depends on seeds[i] only,
            so an image's result does not depend on the batch it is in.
        image_size: (H, W) in pixels, for resolution-dependent schedules.
        max_batch: most latents per model call.
        target_maps: per target, an erythema map (B, 1, H, W) in [0, 1] or None
            (unknown), for backends with ``supports_erythema_map``.

    Returns:
        ``latents`` (B, k, ...): ``latents[i, j]`` is image i edited to target j;
        ``nfe_per_image``: model evaluations spent per source image.
    """
    b = source_latents.shape[0]
    k = len(target_prompts[0]) if b else 0
    if len(source_prompts) != b or len(target_prompts) != b or len(seeds) != b:
        raise ValueError("need one source prompt, one target list and one seed per image")
    if any(len(t) != k for t in target_prompts):
        raise ValueError("every image needs the same number of target prompts")
    if target_maps is not None and len(target_maps) != k:
        raise ValueError(f"{len(target_maps)} erythema maps for {k} targets (give None for a target without one)")
    use_maps = target_maps is not None and any(m is not None for m in target_maps)
    x_src = source_latents
    device, dtype = x_src.device, x_src.dtype
    if image_size is None:
        image_size = tuple(x_src.shape[-2:])  # type: ignore[assignment]
    ts = backend.timesteps(settings.steps, image_size).tolist()
    T = settings.steps
    true_cfg = backend.has_true_cfg
    mixed = settings.guidance_mode == "mixed"
    use_src_in_target = mixed and settings.mixed_source_guidance != 0.0

    # Encode every distinct prompt once; rows index into this table.
    table = list(dict.fromkeys(["", *source_prompts, *(p for ps in target_prompts for p in ps)]))
    cond_all = backend.encode_prompts(table)
    row = {p: i for i, p in enumerate(table)}
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw_noise() -> torch.Tensor:
        return torch.stack([torch.randn(x_src.shape[1:], generator=g) for g in generators]).to(device, dtype)

    def spatial_for(j: int | None) -> torch.Tensor:
        """(B, 2, H, W): target j's map with the known flag, or an unknown map."""
        unknown = torch.zeros((b, 2, *x_src.shape[2:]), device=device, dtype=dtype)
        if j is None or target_maps is None or target_maps[j] is None:
            return unknown
        the_map = target_maps[j].to(device, dtype)
        return torch.cat([the_map, torch.ones_like(the_map)], dim=1)

    def evaluate(latents: list[torch.Tensor], prompts: list[int], scales: list[float], t: float,
                 spatial: list[torch.Tensor]) -> torch.Tensor:
        """One batched model evaluation of (latent, prompt) pairs, in chunks."""
        z = torch.cat(latents)
        maps = torch.cat(spatial) if use_maps else None
        rows = torch.tensor(prompts)
        guidance = torch.tensor(scales, dtype=torch.float32)
        outs = []
        for start in range(0, z.shape[0], max_batch):
            sl = slice(start, start + max_batch)
            outs.append(backend.velocity(z[sl], t, cond_all.index(rows[sl]), guidance[sl].to(device),
                                         spatial=maps[sl] if maps is not None else None))
        return torch.cat(outs)

    def velocities(z_src: torch.Tensor | None, z_tars: list[torch.Tensor], t: float):
        """V_src (B, ...) for the shared source branch (None if z_src is None) and
        V_tar per target (k x (B, ...))."""
        lat, pr, sc, sp, parts = [], [], [], [], []  # parts: (name, target index)

        def add(z: torch.Tensor, prompts: list[str], scale: float, name: tuple, map_of: int | None = None) -> None:
            lat.append(z)
            pr.extend(row[p] for p in prompts)
            sc.extend([scale] * b)
            if use_maps:
                sp.append(spatial_for(map_of))
            parts.append(name)

        empty = [""] * b
        if z_src is not None:
            if true_cfg:
                add(z_src, empty, 1.0, ("src", "u"))
                add(z_src, source_prompts, 1.0, ("src", "c"))
            else:  # guidance-distilled: the scale is a model input
                add(z_src, source_prompts, settings.source_guidance, ("src", "g"))
        for j, z_tar in enumerate(z_tars):
            tgt = [ps[j] for ps in target_prompts]
            if mixed or true_cfg:
                scale = 1.0
                add(z_tar, empty, scale, (j, "u"))
                add(z_tar, tgt, scale, (j, "t"), map_of=j)
                if use_src_in_target:
                    add(z_tar, source_prompts, scale, (j, "s"))
            else:
                add(z_tar, tgt, settings.target_guidance, (j, "g"), map_of=j)
        v = evaluate(lat, pr, sc, t, sp).split(b)
        got = dict(zip(parts, v))

        v_src = None
        if z_src is not None:
            if true_cfg:
                u, c = got[("src", "u")], got[("src", "c")]
                v_src = u + settings.source_guidance * (c - u)
            else:
                v_src = got[("src", "g")]
        v_tars = []
        for j in range(len(z_tars)):
            if not (mixed or true_cfg):
                v_tars.append(got[(j, "g")])
                continue
            u, tg = got[(j, "u")], got[(j, "t")]
            v = u + settings.target_guidance * (tg - u)
            if use_src_in_target:  # eq. (1)
                v = v + settings.mixed_source_guidance * (got[(j, "s")] - u)
            v_tars.append(v)
        return v_src, v_tars

    z_edit = [x_src.clone() for _ in range(k)]
    z_sample: list[torch.Tensor] | None = None  # the plain-sampling phase (n_min)
    nfe_before = backend.nfe
    for i in tqdm(range(T), desc="FlowEdit", unit="step", disable=not progress, leave=False):
        if T - i > settings.n_max:
            continue  # before the editing window: the source is left as it is
        t, t_next = ts[i], ts[i + 1]
        if T - i > settings.n_min:
            delta = [torch.zeros_like(x_src) for _ in range(k)]
            for _ in range(settings.n_avg):
                noise = draw_noise()
                z_src = (1 - t) * x_src + t * noise
                # z_src + (z_edit - x_src): the same as the paper's order, but exact while the
                # edit is still zero, so an identity edit returns the source bit for bit.
                z_tars = [z_src + (ze - x_src) for ze in z_edit]
                v_src, v_tars = velocities(z_src, z_tars, t)
                for j in range(k):
                    delta[j] += (v_tars[j] - v_src) / settings.n_avg
            z_edit = [ze + (t_next - t) * d for ze, d in zip(z_edit, delta)]
        else:
            if z_sample is None:
                # Leave the ODE: noise the edit to time t and sample the target from there.
                noise = draw_noise()
                z_src = (1 - t) * x_src + t * noise
                z_sample = [z_src + (ze - x_src) for ze in z_edit]
            _, v_tars = velocities(None, z_sample, t)
            z_sample = [z + (t_next - t) * v for z, v in zip(z_sample, v_tars)]
    result = z_sample if z_sample is not None else z_edit
    latents = torch.stack(result, dim=1) if k else x_src.new_zeros((b, 0, *x_src.shape[1:]))
    return FlowEditResult(latents=latents, nfe_per_image=(backend.nfe - nfe_before) / max(b, 1))
