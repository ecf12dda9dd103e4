"""privacy_firewall/planning.py: the prompts of one photo's edit."""

from __future__ import annotations

from privacy_firewall.identity import Identity
from privacy_firewall.planning import plan_edit, sex_word
from privacy_firewall.settings import PromptSettings

PROMPTS = PromptSettings(source="a {sex} with erythema", target="a {target_sex} with erythema{identity}",
                         healthy="a {target_sex}, healthy{identity}", original_healthy="a {sex}, healthy{identity}")


def test_a_new_identity_goes_into_the_surrogate_and_its_twin_only():
    plan = plan_edit(PROMPTS, "woman", Identity("man", ("red hair", "round face")), "man", True)
    assert plan.source == "a woman with erythema"
    assert plan.surrogate == "a man with erythema, red hair, round face"
    assert plan.healthy == "a man, healthy, red hair, round face"
    # The patient's own healthy twin keeps the patient: no drawn phrase in its prompt.
    assert plan.original_healthy == "a woman, healthy"
    assert plan.target_sex == "man"
    assert plan.targets == [plan.surrogate, plan.healthy, plan.original_healthy]


def test_without_the_patients_twin_a_traversal_has_two_targets():
    plan = plan_edit(PROMPTS, "man", Identity("woman", ()), "man", False)
    assert plan.targets == ["a woman with erythema", "a woman, healthy"]


def test_opposite_sex_mode_flips_the_sex_and_falls_back_for_a_person():
    assert plan_edit(PROMPTS, "woman", None, "man", True).target_sex == "man"
    assert plan_edit(PROMPTS, "man", None, "man", True).target_sex == "woman"
    person = plan_edit(PROMPTS, "person", None, "woman", True)
    assert person.target_sex == "woman" and person.surrogate == "a woman with erythema"


def test_sex_words_from_metadata():
    assert [sex_word(v) for v in ("F", "male", "Woman", "m")] == ["woman", "man", "woman", "man"]
    assert sex_word("unknown") is None and sex_word(None) is None and sex_word("") is None
