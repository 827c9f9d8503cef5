"""Typed, validated view of params.yaml.

Every section is a frozen pydantic model that rejects unknown keys, so a typo such as
``-S teacher.epoch=3`` fails before any work starts instead of being silently ignored.
Stages call :func:`load_params` and read only their own sections.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from hrkd.errors import HRKDError
from hrkd.registry import KD_METHODS, RATIO_LEARNING, TINYBERT_TEACHERS, TRAINED_TEACHERS

PARAMS_FILE = "params.yaml"

# Fixed, ordered label lists: ids must never depend on set or hash order.
MNLI_LABELS = ("entailment", "neutral", "contradiction")
AMAZON_LABELS = ("negative", "positive")
MNLI_DOMAINS = ("fiction", "government", "slate", "telephone", "travel")
AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction01 = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]

# Profiles of params.yaml `profiles`: the generated demo, real data and checkpoints sized for a CPU,
# and the paper's scale.
PROFILES = ("demo", "small", "paper")
ProfileName = Literal["demo", "small", "paper"]


class RowCaps(Section):
    """At most this many rows per domain of each split, the first ones of the prepared split (null = all).

    For CPU-sized runs on real data: the split itself (seeded, stratified, exact counts) is made
    first and then cut, so a cap keeps the same rows whatever the other caps are.
    """

    train: PositiveInt | None = None
    dev: PositiveInt | None = None
    test: PositiveInt | None = None


class MnliData(Section):
    kind: Literal["mnli"] = "mnli"
    source: str = "nyu-mll/multi_nli"
    revision: str | None = None
    domains: list[str] = Field(default_factory=lambda: list(MNLI_DOMAINS), min_length=1)
    dev_fraction: Fraction01 = 0.1
    max_rows: RowCaps = RowCaps()

    @field_validator("domains")
    @classmethod
    def _known_genres(cls, value: list[str]) -> list[str]:
        return _check_domains(value, MNLI_DOMAINS + ("nineeleven", "oup", "verbatim", "facetoface", "letters"))


class AmazonData(Section):
    kind: Literal["amazon"] = "amazon"
    source: str = "data/raw/domain_sentiment_data.tar.gz"
    sha256: str | None = None
    domains: list[str] = Field(default_factory=lambda: list(AMAZON_DOMAINS), min_length=1)
    split_seed: int = 11111
    counts: dict[str, tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]]
    max_rows: RowCaps = RowCaps()

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, value: list[str]) -> list[str]:
        return _check_domains(value, AMAZON_DOMAINS)

    @model_validator(mode="after")
    def _counts_cover_domains(self) -> "AmazonData":
        missing = [d for d in self.domains if d not in self.counts]
        if missing:
            raise ValueError(f"counts has no (train, dev, test) entry for domain(s) {missing}")
        return self


class CustomData(Section):
    kind: Literal["custom"] = "custom"
    path: str | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    domain_column: str = "domain"
    labels: list[str] | None = None
    domains: list[str] | None = None
    dev_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    seed: int = 42
    max_rows: RowCaps = RowCaps()

    @model_validator(mode="after")
    def _fractions(self) -> "CustomData":
        if self.dev_fraction + self.test_fraction >= 1.0:
            raise ValueError("dev_fraction + test_fraction must be below 1")
        return self


TaskData = Annotated[Union[MnliData, AmazonData, CustomData], Field(discriminator="kind")]


class DemoSizes(Section):
    train: Annotated[int, Field(ge=10)]
    dev: Annotated[int, Field(ge=2)]
    test: Annotated[int, Field(ge=2)]


class DemoCorpus(Section):
    seed: int = 1234
    mnli: DemoSizes = DemoSizes(train=480, dev=80, test=120)
    amazon: DemoSizes = DemoSizes(train=320, dev=60, test=100)


class FewShot(Section):
    tasks: list[str] = Field(default_factory=lambda: ["mnli"])
    rates: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.02, 0.05, 0.1, 0.2], min_length=1
    )
    # Seeds of the few-shot students (one DVC stage each per rate); separate from the top-level
    # `seeds` so the demo can keep its CPU budget while the paper profile sets all five.
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1)

    @field_validator("rates")
    @classmethod
    def _distinct(cls, value: list[float]) -> list[float]:
        if len(set(value)) != len(value):
            raise ValueError("rates must be distinct")
        return sorted(value)


class BertShape(Section):
    """Architecture of a tiny randomly initialised BERT (demo profile)."""

    hidden_size: Annotated[int, Field(ge=4)]
    num_hidden_layers: Annotated[int, Field(ge=1)]
    num_attention_heads: Annotated[int, Field(ge=1)]
    intermediate_size: Annotated[int, Field(ge=4)]

    @model_validator(mode="after")
    def _heads_divide(self) -> "BertShape":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        return self


class DemoModels(Section):
    """Tiny BERTs and the WordPiece vocabulary built from the prepared corpus (demo profile)."""

    vocab_size: Annotated[int, Field(ge=50)] = 1500
    seed: int = 0
    teacher: BertShape = BertShape(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
    student: BertShape = BertShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

    @model_validator(mode="after")
    def _same_heads(self) -> "DemoModels":
        # Attention distillation (eq. 3) compares head i of the student with head i of the teacher.
        if self.teacher.num_attention_heads != self.student.num_attention_heads:
            raise ValueError("teacher and student need the same num_attention_heads for attention distillation")
        return self


class TrainSettings(Section):
    """Optimisation schedule of one training run (AdamW, linear warmup then linear decay)."""

    epochs: Annotated[int, Field(ge=1)] = 3
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: Annotated[float, Field(gt=0.0)] = 5e-5
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    # linear: warmup then linear decay to 0 (BERT); constant: warmup then flat (Meta-KD stage A).
    lr_schedule: Literal["linear", "constant"] = "linear"
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = 1.0
    # Dev evaluation (and checkpoint) every this many optimiser steps, and at the end.
    eval_every: Annotated[int, Field(ge=1)] = 500
    eval_batch_size: Annotated[int, Field(ge=1)] = 128
    # Length-grouped batches (Schedule.group_by_length): megabatches of this many batches sorted
    # by length, so a step pads less and costs less. It changes which rows share a step, hence the
    # numbers, so it is a training setting; 0 = off, the paper's random batches (HF uses 50).
    group_by_length: Annotated[int, Field(ge=0)] = 0


class StudentSettings(TrainSettings):
    """Student schedule. ``lr`` is the fallback; per-task and few-shot rates win over it, and the
    top-level ``lr`` param (when set) wins over everything."""

    epochs: Annotated[int, Field(ge=1)] = 10
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    task_lr: dict[str, Annotated[float, Field(gt=0.0)]] = Field(default_factory=lambda: {"mnli": 1e-3, "amazon": 5e-4})
    fewshot_lr: Annotated[float, Field(gt=0.0)] = 5e-5


class Profile(Section):
    max_seq_len: Annotated[int, Field(ge=8, le=512)] = 128
    teacher: TrainSettings = TrainSettings()
    student: StudentSettings = StudentSettings()
    # Meta-KD (docs/metakd.md). Defaults = the authors' scripts: meta-teacher lr 2e-5, 3 epochs;
    # stage A (intermediate layers) lr 5e-5, 10 epochs, constant rate; stage B (prediction layer)
    # lr 3e-5, 3 epochs, warmup-linear. The top-level `lr` overrides stage B's rate.
    meta_teacher: TrainSettings = TrainSettings(lr=2e-5)
    metakd_stage_a: TrainSettings = TrainSettings(epochs=10, lr=5e-5, warmup_ratio=0.0, lr_schedule="constant")
    metakd_stage_b: TrainSettings = TrainSettings(epochs=3, lr=3e-5)
    # "demo" = the tiny random BERT built by the pretrained stage from models.demo; anything else is
    # a hub id (bert-base-uncased) or a local directory holding a save_pretrained checkpoint.
    teacher_model: str = "bert-base-uncased"
    student_model: str = "huawei-noah/TinyBERT_General_4L_312D"
    model_revision: str | None = None
    # Keep only the first k encoder layers of the checkpoint (embeddings and layers 0..k-1, as
    # DistilBERT initialises its student); null = all. A student made this way shares the
    # teacher's vocabulary and head count by construction.
    teacher_layers: PositiveInt | None = None
    student_layers: PositiveInt | None = None

    @model_validator(mode="after")
    def _demo_has_no_layers_to_cut(self) -> "Profile":
        for role in ("teacher", "student"):
            if getattr(self, f"{role}_model") == "demo" and getattr(self, f"{role}_layers") is not None:
                raise ValueError(f"{role}_layers cuts a real checkpoint; the demo BERT's depth is models.{role}.num_hidden_layers")
        return self


def _device_list(value: Any) -> Any:
    """3 / [0, 1] / "0,1" -> "3" / "0,1" (the CUDA_VISIBLE_DEVICES form)."""
    if isinstance(value, bool):
        return value  # rejected by the str check, not read as device 1
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return ",".join(map(str, value))
    return value


class Engine(Section):
    """How runs execute: where, in how many processes, at what precision; never which method or schedule."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on GPUs that support it, fp16 + GradScaler on older GPUs, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The frozen teachers' forwards in distillation. auto: the step's precision on GPU; bf16 on
    # CPUs with native bf16 units (avx512_bf16, amx_bf16), fp32 on other CPUs. bf16 moves the
    # distillation losses by less than docs/speed.md's tolerance, not by nothing: this is the one
    # engine setting that changes numbers beyond float reordering.
    teacher_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Processes per run. >1 relaunches the stage under torchrun (DDP; one GPU each, gloo on CPU).
    nproc: Annotated[int, Field(ge=1)] = 1
    log_every: Annotated[int, Field(ge=1)] = 10
    progress: bool = True
    # Distillation keeps the frozen teachers' outputs of every training row after their first
    # step when they fit in this many GiB (the same numbers up to float rounding, one teacher
    # forward per row per run instead of per epoch); 0 recomputes them every step.
    teacher_cache_gib: Annotated[float, Field(ge=0.0)] = 2.0
    # Tokenised splits are kept in this folder (relative to the DVC root), keyed by the data
    # file's bytes, the tokenizer and max_seq_len, and read back by later stages instead of
    # tokenising again (hrkd.data.loading.TokenCache); null tokenises in every stage.
    token_cache: str | None = "runs/cache/tokens"
    # The GPUs a stage may use (CUDA_VISIBLE_DEVICES): 3, [0, 1] or "0,1"; null = all visible. No
    # stage tracks engine settings, so `dvc exp run --queue -S engine.gpus=3` pins a queued
    # experiment to GPU 3 without invalidating anything (docs/experiments.md). On the command line
    # write several as a list, -S 'engine.gpus=[0,1]': Hydra reads 0,1 as a sweep of two runs.
    gpus: Annotated[str, BeforeValidator(_device_list), Field(pattern=r"^[0-9]+(,[0-9]+)*$")] | None = None
    # DDP across machines (torchrun's static rendezvous): every one of the nnodes machines runs the
    # same stage with nproc processes and its own node_rank; node 0 (master_addr:master_port)
    # writes the outputs.
    nnodes: Annotated[int, Field(ge=1)] = 1
    node_rank: Annotated[int, Field(ge=0)] = 0
    master_addr: str = "127.0.0.1"
    master_port: Annotated[int, Field(ge=1, le=65535)] = 29500

    @model_validator(mode="after")
    def _node_rank_in_range(self) -> "Engine":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} needs nnodes > {self.node_rank} (node ranks are 0..nnodes-1)")
        return self


TeacherKind = Literal[TRAINED_TEACHERS]  # type: ignore[valid-type]


class Teacher(Section):
    kinds: list[TeacherKind] = Field(default_factory=lambda: list(TRAINED_TEACHERS), min_length=1)
    seed: int = 42


class MetaKDScores(Section):
    """Transferability scores t_i (Meta-KD spec 1a), from the frozen pre-trained teacher encoder."""

    # paper: per-class-per-domain prototypes; code: per-domain centroids (the authors' script).
    variant: Literal["paper", "code"] = "paper"
    alpha: Annotated[float, Field(ge=0.0)] = 0.5  # weight of the own-domain cosine
    zeta: Annotated[float, Field(ge=0.0)] = 0.5  # weight of the other-domain cosine
    mask_padding: bool = False  # false = E(x) averages padding too (authors' code)
    batch_size: Annotated[int, Field(ge=1)] = 128


class MetaKDTeacher(Section):
    """The meta-teacher's domain branch and loss (spec 1b)."""

    domain_loss_weight: Annotated[float, Field(ge=0.0)] = 0.5  # gamma1; 0 = the released Amazon script
    sample_weights: bool = True  # weight each row's loss by t_i
    mask_padding: bool = False  # false = h-bar averages padding too (authors' code)
    branch_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None  # None = the encoder's hidden dropout


class MetaKDDistill(Section):
    """Meta-distillation (spec 1c)."""

    # two-stage: the authors' code (stage A lambda-weighted intermediate layers, stage B prediction
    # layer); joint: the paper's single lambda-weighted objective on stage B's schedule.
    schedule: Literal["two-stage", "joint"] = "two-stage"
    tkd_weight: Annotated[float, Field(ge=0.0)] = 0.5  # gamma2
    temperature: Annotated[float, Field(gt=0.0)] = 1.0  # of the prediction loss (original code: 1)
    class_mean: bool = False  # true = the original soft CE that also averages over classes
    mask_queries: bool = False  # also zero padded query rows of the attention maps


class MetaKD(Section):
    """Meta-KD (Pan et al., ACL 2021), the rival baseline; see docs/metakd.md."""

    scores: MetaKDScores = MetaKDScores()
    teacher: MetaKDTeacher = MetaKDTeacher()
    distill: MetaKDDistill = MetaKDDistill()


DistillMethod = Literal[KD_METHODS]  # type: ignore[valid-type]
# How the relational graph's ratios learn (docs/hrkd-method.md, "How the ratios learn").
RatioLearning = Literal[RATIO_LEARNING]  # type: ignore[valid-type]


class Distill(Section):
    """Method hyper-parameters of section 2 (shared by every profile)."""

    # Single-domain TinyBERT-KD students are distilled from each of these teacher kinds.
    tinybert_teachers: list[Literal[TINYBERT_TEACHERS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(TINYBERT_TEACHERS))
    # Multi-domain students distilled from the HRKD-teacher (Tables 2-4).
    methods: list[DistillMethod] = Field(
        default_factory=lambda: ["multi-domain-kd", "hrkd", "no-self-attention", "no-comp-agg", "no-hierarchical",
                                 "hrkd-dro"]
    )
    gamma: Annotated[float, Field(ge=0.0)] = 1.0
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    # per-domain: domain d is distilled from the teacher checkpoint selected on domain d (authors);
    # shared: one checkpoint for all domains (the one selected on the average dev accuracy... see docs).
    teacher_checkpoint: Literal["per-domain", "shared"] = "per-domain"
    # paper: the graph minimises eq. 17 with the student; frozen: the authors' code (the graph stays
    # at its random init); dro: the graph maximises eq. 17 minus dro_tau * KL(r || uniform) on
    # relative losses while the student minimises it (method hrkd-dro always uses dro).
    ratios: RatioLearning = "paper"
    dro_tau: Annotated[float, Field(gt=0.0)] = 1.0
    # dro: the graph's learning rate as a fraction of the student's. At the student's rate the
    # adversary chases each batch's loss noise (its objective ends below the uniform r's); the
    # robust optimum is close to uniform on real data (relative losses 0.87-1.19).
    dro_graph_lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    graph_skip: bool = False  # true = root/skip term in both GAT layers (not in the paper; dro implies it)
    graph_heads: Annotated[int, Field(ge=1)] = 8
    graph_hidden: Annotated[int, Field(ge=1)] | None = None  # None = prototype width F
    graph_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    prototype_padding: bool = True  # eq. 6 averages over all L positions (paper and authors' code)
    # raw: eq. 6 over the student's own outputs (the paper); projected: over W^embd / W_m^hidn's
    # outputs, at the teacher's width (the authors' code)
    prototype_features: Literal["raw", "projected"] = "raw"
    class_mean: bool = False  # true = the authors' soft CE that also averages over classes
    mask_queries: bool = False  # also zero padded query rows of the attention maps
    seed_offset: int = 0

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "graph_trainable" in data:
            fix = "ratios: frozen" if data["graph_trainable"] is False else "ratios: paper"
            raise ValueError(f"distill.graph_trainable was replaced by distill.ratios (paper | frozen | dro): "
                             f"write {fix} instead")
        return data


class CaseStudy(Section):
    """Tables 5-6: ratios of the trained HRKD student on a few test examples."""

    # Task of the case study (the paper uses Amazon); the report falls back to the first task in
    # `tasks` when this one is not prepared (e.g. a custom-data run), and says so.
    task: str = "amazon"
    # Case k takes the k-th test row of every domain (first rows, not hand-picked).
    examples: Annotated[int, Field(ge=1, le=20)] = 2


class Report(Section):
    """The report stage (tables, significance, figures); changes no training run."""

    # Significance level of the paired t-test of HRKD vs its TinyBERT-KD baseline (paper: p < 0.1).
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    # Fewer pairs than this and the report states "too few samples" instead of a p-value.
    min_pairs: Annotated[int, Field(ge=2)] = 3
    # Decimals of accuracies (%) in the tables (the paper prints 1).
    decimals: Annotated[int, Field(ge=0, le=4)] = 1
    case_study: CaseStudy = CaseStudy()


class Params(Section):
    profile: ProfileName = "demo"
    lr: Annotated[float, Field(gt=0.0)] | None = None
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1)
    tasks: list[str] = Field(default_factory=lambda: ["mnli", "amazon"], min_length=1)
    data: dict[str, TaskData]
    demo: DemoCorpus = DemoCorpus()
    fewshot: FewShot = FewShot()
    models: DemoModels = DemoModels()
    engine: Engine = Engine()
    teacher: Teacher = Teacher()
    distill: Distill = Distill()
    metakd: MetaKD = MetaKD()
    report: Report = Report()
    profiles: dict[ProfileName, Profile]

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        for task in self.tasks:
            if task not in self.data:
                raise ValueError(f"tasks names '{task}' but data has no section for it (known: {sorted(self.data)})")
        for task in self.fewshot.tasks:
            if task not in self.tasks:
                raise ValueError(f"fewshot.tasks names '{task}', which is not in tasks {self.tasks}")
        if self.profile not in self.profiles:
            raise ValueError(f"profiles has no '{self.profile}' section")
        return self

    def student_lr(self, task: str, fewshot: bool = False) -> float:
        """The student learning rate of a run: top-level ``lr`` > few-shot rate > per-task rate > fallback."""
        if self.lr is not None:
            return self.lr
        student = self.active.student
        if fewshot:
            return student.fewshot_lr
        return student.task_lr.get(task, student.lr)

    @property
    def active(self) -> Profile:
        """Settings of the profile selected by ``profile``."""
        return self.profiles[self.profile]

    def task(self, name: str) -> MnliData | AmazonData | CustomData:
        if name not in self.data:
            raise HRKDError(
                f"unknown task '{name}': params.yaml data defines {sorted(self.data)}; "
                "add a data.<task> section or pick one of those"
            )
        return self.data[name]


def _check_domains(value: list[str], known: tuple[str, ...]) -> list[str]:
    unknown = [d for d in value if d not in known]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known domains are {list(known)}")
    if len(set(value)) != len(value):
        raise ValueError("domains must be distinct")
    return value


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    parts: list[str] = []
    for part in first["loc"]:
        text = str(part)
        if text.startswith(("function-", "tagged-")) or (parts and parts[-1] == text):
            continue  # pydantic's union/discriminator tags, not keys the user wrote
        parts.append(f"[{text}]" if isinstance(part, int) else text)
    key = ".".join(parts).replace(".[", "[")
    knob = re.sub(r"\[\d+\]$", "", key)
    more = f" (+{len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{more}; remove it or check its spelling against README's parameter list"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    got_txt = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    if not key:
        return f"{source}: {msg}{more}; fix it in {source}"
    return f"{source}: invalid '{key}': {msg}{got_txt}{more}; fix it in {source} or with dvc exp run -S {knob}=..."


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    if not isinstance(raw, dict):
        raise HRKDError(f"{source}: expected a mapping of sections at the top level; restore it from git")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise HRKDError(_format_error(err, source)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml, raising :class:`HRKDError` with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise HRKDError(f"{path} not found: run the stage from the repository root (where params.yaml lives)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise HRKDError(f"{path} is not valid YAML{at}: {getattr(err, 'problem', err)}; fix the syntax there") from None
    return parse_params(raw, str(path))
