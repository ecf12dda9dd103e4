"""New identities: what a surrogate looks like, drawn per photo from the secret key.

A sex swap is not de-identification: an attacker who holds the photo still
recognises the background, the skin tone, the eyes, the face shape, the ears and
the jewellery in the surrogate. So every attribute a backend can express is
drawn at random for each photo (:func:`draw_identity`), independently of the
source, from a generator seeded by the hospital's secret key and the photo's
digest: the same key and photo give the same identity, nobody else can predict
it. What the identity does not name (and the erythema, kept by design) comes
from the photo only as far as the edit lets it through; the gate
(:mod:`privacy_firewall.gate`) checks the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEXES = ("woman", "man")

#: Identity attributes a general text-to-image model (SD3, FLUX) can be asked
#: for in words. Skin tone is not drawn: the erythema is read as an a* rise over
#: the skin, and a large tone change alters how much of it stays measurable.
PHOTO_IDENTITY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "age": ("in their twenties", "in their thirties", "in their forties", "in their fifties", "in their sixties"),
    "hair_colour": ("black hair", "dark brown hair", "light brown hair", "blond hair", "red hair", "gray hair"),
    "hair_style": ("short straight hair", "short curly hair", "long straight hair", "long wavy hair",
                   "shaved head", "hair in a bun"),
    "eyes": ("brown eyes", "blue eyes", "green eyes", "hazel eyes", "gray eyes"),
    "face": ("a narrow face", "an oval face", "a round face", "a square face", "a heart-shaped face"),
    "nose": ("a small nose", "a straight nose", "a broad nose", "an aquiline nose"),
    "brows": ("thin eyebrows", "thick eyebrows", "arched eyebrows", "straight eyebrows"),
    "ears": ("small ears", "large ears", "ears hidden by hair"),
    "facial_hair": ("clean-shaven", "a short beard", "a full beard", "a moustache"),
    "glasses": ("no glasses", "thin-rimmed glasses"),
    "background": ("a plain white background", "a plain gray background", "a blue background",
                   "a green background", "a beige wall", "a dark background"),
}

#: Attributes only drawn for men (a woman is drawn clean-shaven).
MALE_ONLY_VALUES = {"facial_hair": ("a short beard", "a full beard", "a moustache", "beard")}
FEMALE_DEFAULT = {"facial_hair": "clean-shaven", "beard": "clean-shaven"}


@dataclass(frozen=True)
class Identity:
    """A drawn identity: its sex word and one phrase per attribute."""

    sex: str
    phrases: tuple[str, ...]

    def prompt_suffix(self) -> str:
        """``", blond hair, wide face, ..."`` for the ``{identity}`` prompt field."""
        return "".join(f", {p}" for p in self.phrases)


def draw_identity(attributes: dict[str, tuple[str, ...]], seed: int) -> Identity:
    """One new identity: a sex and one phrase per attribute, uniformly and
    independently of the source (so no attribute of the source is more likely in
    the surrogate than chance)."""
    rng = np.random.default_rng(seed)
    sex = SEXES[int(rng.integers(len(SEXES)))]
    phrases = []
    for name, values in attributes.items():
        choice = values[int(rng.integers(len(values)))]
        if sex == "woman" and choice in MALE_ONLY_VALUES.get(name, ()):
            choice = FEMALE_DEFAULT[name]
        phrases.append(choice)
    return Identity(sex, tuple(phrases))


def keep_attributes(identity: Identity, kept: tuple[str, ...], attributes: dict[str, tuple[str, ...]]) -> Identity:
    """``identity`` with the source's ``kept`` phrases in place of the drawn
    phrases of the same attributes (a kept skin tone replaces the drawn one;
    a kept phrase of no drawn attribute, such as the view, is added)."""
    replaced = {name for name, values in attributes.items() if any(k in values for k in kept)}
    drawn = [p for p in identity.phrases if not any(p in attributes[name] for name in replaced)]
    return Identity(identity.sex, tuple(drawn) + tuple(kept))
