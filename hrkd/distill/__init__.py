"""Distillation (eqs. 1-17) and the student runs of Tables 2-4.

* :mod:`hrkd.distill.batches`        - a collated step plus where each domain's rows are;
* :mod:`hrkd.distill.teacher_models` - which teacher checkpoint serves each domain, loaded once;
* :mod:`hrkd.distill.teacher_cache`  - the teachers' outputs of every training row, kept in memory;
* :mod:`hrkd.distill.objective`      - :class:`~hrkd.distill.objective.KDObjective`, eq. 5 or eq. 17;
* :mod:`hrkd.distill.ratios`         - the relational graph outside training (on disk, Tables 5-6);
* :mod:`hrkd.distill.runs`           - the student runs, on top of :mod:`hrkd.driver`.

This package imports nothing on purpose: the report reads ratios without the training stack,
and each stage's dvc.yaml entry depends only on the modules it uses.
"""
