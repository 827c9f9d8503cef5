"""Teacher kinds and distillation methods as data: the one place their names and switches live.

Config validation, the run code, the report and dvc.yaml's stage names all read these tables,
so adding a method is one entry here plus its behaviour where the entry says (e.g. a new graph
switch in :mod:`hrkd.distill.objective`). Plain data, no torch: everything can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hrkd.errors import HRKDError


@dataclass(frozen=True)
class TeacherKind:
    """A teacher of section 3.2 (or Meta-KD's meta-teacher) and how it trains."""

    name: str
    label: str  # its row in Tables 2-3
    schedule: str  # hrkd.data.loading.Schedule kind
    multi_head: bool  # one classification head per domain
    per_domain: bool  # one model per domain, each trained on its domain only
    sum_domains: bool  # the step loss sums each domain's mean CE (section 2.1)
    unused_parameters: bool  # some parameters get no gradient in a step (DDP must look for them)
    tinybert: bool  # Tables 2-3 distil TinyBERT-KD students from it
    metakd: bool = False  # Meta-KD's meta-teacher (its own stage, train_meta_teacher)


TEACHERS: dict[str, TeacherKind] = {k.name: k for k in (
    TeacherKind("single", "BERT_B-single", "single", multi_head=False, per_domain=True, sum_domains=False,
                unused_parameters=False, tinybert=True),
    TeacherKind("mix", "BERT_B-mix", "mix", multi_head=False, per_domain=False, sum_domains=False,
                unused_parameters=False, tinybert=True),
    # Each batch comes from one domain, so the other domains' heads get no gradient.
    TeacherKind("mtl", "BERT_B-mtl", "mtl", multi_head=True, per_domain=False, sum_domains=False,
                unused_parameters=True, tinybert=True),
    TeacherKind("hrkd", "HRKD-teacher", "parallel", multi_head=True, per_domain=False, sum_domains=True,
                unused_parameters=False, tinybert=False),
    # The domain branch gets no gradient when metakd.teacher.domain_loss_weight is 0.
    TeacherKind("meta", "Meta-teacher", "mix", multi_head=False, per_domain=False, sum_domains=False,
                unused_parameters=True, tinybert=False, metakd=True),
)}
# The kinds of the train_teacher stage (teacher.kinds); ``meta`` has its own stage.
TRAINED_TEACHERS = tuple(k for k, v in TEACHERS.items() if not v.metakd)
TINYBERT_TEACHERS = tuple(k for k, v in TEACHERS.items() if v.tinybert)
HRKD_TEACHER = "hrkd"
META_TEACHER = "meta"


@dataclass(frozen=True)
class Method:
    """A distillation method: which teacher it reads, what it trains and which graph it uses."""

    name: str
    label: str  # its row in Table 4
    teachers: tuple[str, ...]  # teacher kinds it can distil from; the first is the paper's
    per_domain: bool = False  # one single-head student per domain (else one student, a head per domain)
    graph: bool = False  # eq. 17 with ratios from the relational graph (else eq. 5)
    self_attention: bool = True  # graph switches of the Table 4 ablations
    comp_agg: bool = True
    hierarchical: bool = True
    ratios: str | None = None  # fixed way the ratios learn; None = distill.ratios
    extension: bool = False  # not in the paper
    metakd: bool = False  # Meta-KD's meta-distillation (hrkd.metakd.distill), not KDObjective
    arrow: str = ""  # Tables 2-3 name a student "<teacher> →(<arrow>) BERT_S"


# Any trained teacher serves the KD methods (the paper pairs multi-domain students with the
# HRKD-teacher; a run from another kind is named <kind>-<method>).
_KD = (HRKD_TEACHER, *(k for k in TRAINED_TEACHERS if k != HRKD_TEACHER))

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("tinybert-kd", "TinyBERT-KD", TRAINED_TEACHERS, per_domain=True, arrow="TinyBERT-KD"),
    Method("multi-domain-kd", "− Domain Rel.", _KD, arrow="TinyBERT-KD"),
    Method("no-domain-rel", "− Domain Rel.", _KD),  # the same computation as multi-domain-kd
    Method("hrkd", "HRKD", _KD, graph=True, arrow="HRKD"),
    Method("no-self-attention", "− Self-attention", _KD, graph=True, self_attention=False),
    Method("no-comp-agg", "− Comp-Agg", _KD, graph=True, comp_agg=False),
    Method("no-hierarchical", "− Hierarchical Rel.", _KD, graph=True, hierarchical=False),
    Method("hrkd-dro", "HRKD, robust ratios (not in the paper)", _KD, graph=True, ratios="dro", extension=True),
    Method("hrkd-frozen", "HRKD, graph frozen at init (authors' code)", _KD, graph=True, ratios="frozen",
           extension=True),
    Method("metakd", "Meta-distillation", (META_TEACHER,), per_domain=True, metakd=True, arrow="Meta-distillation"),
)}
# The methods of the distill stage (distill.methods) and KDObjective.
KD_METHODS = tuple(m for m, v in METHODS.items() if not v.metakd)
GRAPH_METHODS = tuple(m for m, v in METHODS.items() if v.graph)
METAKD = "metakd"
RATIO_LEARNING = ("paper", "frozen", "dro")
TINYBERT_SUFFIX = "-tinybert-kd"


def teacher_kind(name: str) -> TeacherKind:
    if name not in TEACHERS:
        raise HRKDError(f"unknown teacher kind '{name}': choose one of {list(TEACHERS)}")
    return TEACHERS[name]


def method(name: str, teacher: str | None = None) -> Method:
    """The method named ``name``; with ``teacher``, also check it distils from that teacher kind."""
    if name not in METHODS:
        raise HRKDError(f"unknown distillation method '{name}': choose one of {list(METHODS)}")
    m = METHODS[name]
    if teacher is not None:
        teacher_kind(teacher)
        if teacher not in m.teachers:
            raise HRKDError(f"method {name} distils from the {'/'.join(m.teachers)} teacher: use "
                            f"--teacher {m.teachers[0]} (got '{teacher}')")
    return m


def run_name(method_name: str, teacher: str) -> str:
    """Output name of a student run: the method's name from its paper teacher (``hrkd``,
    ``metakd``), else ``<teacher>-<method>`` (``single-tinybert-kd``)."""
    m = method(method_name, teacher)
    return m.name if teacher == m.teachers[0] and m.name != "tinybert-kd" else f"{teacher}-{m.name}"


def parse_run_name(run: str) -> tuple[str, str]:
    """(method, teacher kind) of a :func:`run_name`."""
    if run in METHODS and run != "tinybert-kd":
        return run, METHODS[run].teachers[0]
    teacher, _, name = run.partition("-")
    if teacher not in TEACHERS or name not in METHODS:
        raise HRKDError(f"'{run}' is not a student run name (<method> or <teacher kind>-<method>)")
    return name, teacher


def student_stage(task: str, run: str, seed: int, fewshot_rate: str | None = None) -> str:
    """The dvc.yaml stage that writes a student run's outputs."""
    name, teacher = parse_run_name(run)
    where = f"{task}-{fewshot_rate}" if fewshot_rate else task
    fs = "_fewshot" if fewshot_rate else ""
    if name == "tinybert-kd":
        return f"distill{fs}_tinybert@{where}-{teacher}-{seed}"
    if METHODS[name].metakd:
        return f"distill{fs}_metakd@{where}-{seed}"
    return f"distill{fs}@{where}-{run}-{seed}"
