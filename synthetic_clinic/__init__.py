"""The synthetic clinic: procedural face photos with known erythema ground truth.

No patient photos and no model weights are needed: every image, mask and healthy
twin is rendered from a seed, so any machine can test the whole pipeline.
"""

from synthetic_clinic.clinic import (
    ClinicSubject,
    generate_clinic,
    read_mask,
    read_metadata,
    read_rgb,
    render_subject,
    subject_for,
)
from synthetic_clinic.render import Subject, render, sample_subject

__all__ = [
    "ClinicSubject",
    "Subject",
    "generate_clinic",
    "read_mask",
    "read_metadata",
    "read_rgb",
    "render",
    "render_subject",
    "sample_subject",
    "subject_for",
]
