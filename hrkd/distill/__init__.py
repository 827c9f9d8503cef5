"""Distillation stage: the KD objective (eqs. 1-17) and the student runs of Tables 2-4.

``objective`` holds the trainable module and the relational-ratio helpers; ``runs`` the
per-method training loops on top of :mod:`hrkd.engine`. Importing this package loads torch
and the project's pure modules only; models are imported when a run starts.
"""

from hrkd.distill.objective import (
    HRKD_METHODS,
    METHODS,
    RELATIONAL_DIR,
    TEACHER_KINDS,
    DistillBatch,
    KDObjective,
    TeacherGroup,
    load_relational,
    load_teachers,
    make_distill_batch,
    relational_ratios,
    teacher_checkpoints,
)
from hrkd.distill.runs import distill_student, run_name, student_settings

__all__ = [
    "HRKD_METHODS",
    "METHODS",
    "RELATIONAL_DIR",
    "TEACHER_KINDS",
    "DistillBatch",
    "KDObjective",
    "TeacherGroup",
    "distill_student",
    "load_relational",
    "load_teachers",
    "make_distill_batch",
    "relational_ratios",
    "run_name",
    "student_settings",
    "teacher_checkpoints",
]
