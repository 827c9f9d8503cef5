"""Meta-KD (Pan et al., ACL 2021): the rival baseline of HRKD's Tables 2-3.

* :mod:`hrkd.metakd.losses`  - pure loss functions (teacher, expertise weights, per-example KD terms);
* :mod:`hrkd.metakd.scores`  - transferability scores t_i from the frozen pre-trained teacher encoder;
* :mod:`hrkd.metakd.teacher` - the meta-teacher's domain branch and objective (teacher kind ``meta``);
* :mod:`hrkd.metakd.distill` - meta-distillation of one student per domain (method ``metakd``).

This package imports nothing on purpose: each stage imports (and its dvc.yaml entry depends on)
only the modules it uses. See docs/metakd.md.
"""
