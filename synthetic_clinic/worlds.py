"""Two synthetic worlds: what anyone can render, and what only the hospitals see.

The **public world** is the clinic the project has always rendered: diffuse red
erythema on cheeks, forehead, nose and chin, on every skin tone. Everything that
stands for public data uses it and only it: the embedded generator's training
pool, the attribute judge, the identity matcher, every baseline and every
attacker.

The **hospital world** holds the hospitals' patients. Besides the public world's
classic presentation it has three that public collections rarely show, each
rendered after its clinical description:

* ``skin_of_colour``: erythema on darker skin (Fitzpatrick V-VI) looks
  violaceous, dusky or red-brown, with far less contrast than on light skin.
  Models trained on public images do markedly worse there (Daneshjou et al.,
  "Disparities in dermatology AI performance on a diverse, curated clinical
  image set", Science Advances 8, eabq6147, 2022); textbooks show it rarely
  (Adelekun, Onyekaba and Lipoff, "Skin color in dermatology textbooks",
  J Am Acad Dermatol 84(1):194-196, 2021). Rendered on skin tones >= 0.72 with a
  tint that darkens all three channels (red least): about half the classic a*
  rise.
* ``annular``: annular plaques with a sharply demarcated, scaly active border
  and central clearing, as in tinea faciei and subacute cutaneous lupus
  erythematosus (Bolognia, Schaffer and Cerroni, Dermatology, 4th ed., 2018,
  ch. 19 "Annular and figurate erythemas"; Rook's Textbook of Dermatology,
  9th ed., 2016). The cleared centre keeps a faint brown post-inflammatory tone
  that is not erythema.
* ``perioral``: perioral dermatitis, erythema with small papules around the
  mouth that spares a narrow band next to the vermilion border (Lipozencic and
  Ljubojevic, "Perioral dermatitis", Clinics in Dermatology 29(2):157-161,
  2011). A facial region the public world never has erythema in; women are
  affected far more often, so the presentation is rendered beardless, full face.

Subject ``i`` of seed ``s`` in the public world is byte for byte the clinic's
``render_subject(s, i)``. In the hospital world the same attributes are drawn
first, then a second generator seeded ``[s, i, 1]`` picks the presentation and
adapts the attributes it needs, so worlds share identities but not pathology.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from synthetic_clinic.render import ERYTHEMA_REGIONS, PRESENTATIONS, Subject

WORLDS = ("public", "hospital")

#: The share of each presentation among the hospital world's patients.
HOSPITAL_PRESENTATION_SHARES = {"classic": 0.25, "skin_of_colour": 0.25, "annular": 0.25, "perioral": 0.25}
#: Presentations the public world never renders.
HOSPITAL_ONLY_PRESENTATIONS = tuple(p for p in PRESENTATIONS if p != "classic")
_SKIN_OF_COLOUR_TONES = (0.72, 1.0)


def check_world(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    return world


def check_presentation(presentation: str) -> str:
    if presentation not in PRESENTATIONS:
        raise ValueError(f"presentation must be one of {', '.join(PRESENTATIONS)}, got {presentation!r}")
    return presentation


def in_world(subject: Subject, seed: int, index: int, world: str, presentation: str | None = None) -> Subject:
    """``subject`` (drawn for (seed, index)) as a patient of ``world``.

    ``presentation`` forces one (balanced held-out sets); by default the hospital
    world draws it from :data:`HOSPITAL_PRESENTATION_SHARES`."""
    check_world(world)
    if world == "public":
        if presentation not in (None, "classic"):
            raise ValueError(f"the public world renders only classic erythema, not {presentation!r}")
        return subject
    rng = np.random.default_rng([seed, index, 1])
    names = list(HOSPITAL_PRESENTATION_SHARES)
    drawn = str(rng.choice(names, p=list(HOSPITAL_PRESENTATION_SHARES.values())))
    chosen = check_presentation(presentation) if presentation is not None else drawn
    changes: dict[str, object] = {"presentation": chosen}
    if chosen == "skin_of_colour":
        lo, hi = _SKIN_OF_COLOUR_TONES
        changes["skin_tone"] = float(rng.uniform(lo, hi))
    elif chosen == "annular":
        k = int(rng.choice([1, 1, 2]))
        changes["erythema_regions"] = tuple(sorted(rng.choice(ERYTHEMA_REGIONS, size=k, replace=False).tolist()))
    elif chosen == "perioral":
        changes.update(view="full_face", beard=0.0, erythema_regions=("perioral",))
        changes["extra"] = {**subject.extra, "beard_if_male": 0.0}
    return replace(subject, **changes)
