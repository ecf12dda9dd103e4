"""What the firewall asks of the model for one photo: the source's sex and the
prompts of its edit, as one named plan."""

from __future__ import annotations

from dataclasses import dataclass

from privacy_firewall.identity import Identity
from privacy_firewall.settings import PromptSettings

#: Words a metadata ``sex`` column may hold, and the prompt word for each.
SEX_WORDS = {"female": "woman", "woman": "woman", "f": "woman", "male": "man", "man": "man", "m": "man"}
OPPOSITE = {"woman": "man", "man": "woman"}

__all__ = ["OPPOSITE", "SEX_WORDS", "EditPlan", "plan_edit", "sex_word"]


@dataclass(frozen=True)
class EditPlan:
    """The prompts of one photo's edit."""

    source: str  # the photo as it is
    surrogate: str  # the new identity, with the erythema
    healthy: str  # the new identity, healthy (the surrogate's twin)
    original_healthy: str  # the patient, healthy
    target_sex: str
    with_original_twin: bool = True  # a traversal from the photo also makes the patient's twin

    @property
    def targets(self) -> list[str]:
        """The target prompts of one FlowEdit traversal from the photo, in the
        order the firewall reads its latents: surrogate, twin, patient's twin."""
        return [self.surrogate, self.healthy] + ([self.original_healthy] if self.with_original_twin else [])


def sex_word(value: str | None) -> str | None:
    """The prompt word for a metadata ``sex`` value, None when it names none."""
    return SEX_WORDS.get(str(value).lower()) if value else None


def plan_edit(prompts: PromptSettings, sex: str, identity: Identity | None, fallback_target_sex: str,
              original_healthy_twin: bool) -> EditPlan:
    """The plan for a source of ``sex``: toward ``identity`` (new_identity), or the
    opposite sex with nothing else (``identity`` None: the paper's single traversal)."""
    if identity is None:
        target_sex, suffix = OPPOSITE.get(sex, fallback_target_sex), ""
    else:
        target_sex, suffix = identity.sex, identity.prompt_suffix()
    fields = {"sex": sex, "target_sex": target_sex, "identity": suffix}
    # The patient's own twin keeps the patient: no drawn identity in its prompt.
    return EditPlan(source=prompts.source.format(**fields), surrogate=prompts.target.format(**fields),
                    healthy=prompts.healthy.format(**fields),
                    original_healthy=prompts.original_healthy.format(**{**fields, "identity": ""}),
                    target_sex=target_sex, with_original_twin=original_healthy_twin)
