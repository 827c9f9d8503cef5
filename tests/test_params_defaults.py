"""params.yaml and hrkd/config.py tell the same defaults.

params.yaml writes out (nearly) every setting, so that ``dvc exp run -S key=value`` can change it
(DVC applies -S in Hydra's struct mode: a key params.yaml lacks needs ``-S +key=value``) and
``dvc exp show`` lists it; the typed config in hrkd/config.py gives each setting a default too. Two
copies of one value drift apart silently, so:

* every value params.yaml sets equals the config's default for that key - the default of the
  enclosing section when that section has one (``Profile.meta_teacher = TrainSettings(lr=2e-5)``:
  2e-5 is the default of ``profiles.<p>.meta_teacher.lr``), else the field's - unless the key is a
  deliberate choice listed in DELIBERATE with its reason;
* every setting that has a default appears in params.yaml wherever params.yaml writes its
  section, unless it is listed in OMITTED with its reason.

Settings without a default (``data``, ``profiles``, Amazon's ``counts``, ...) have one source
already, params.yaml. Every listed pattern must still match something, so the lists cannot outlive
their reasons. Patterns are dotted keys with ``*`` wildcards (fnmatch).
"""

from __future__ import annotations

import copy
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from hrkd.config import parse_params

REPO = Path(__file__).resolve().parents[1]

DELIBERATE = {
    "profiles.demo.*": "the demo profile: tiny random BERTs and schedules of CPU minutes; hrkd/config.py's Profile "
                       "defaults are the paper's",
    "profiles.small.*": "the small profile: the real MiniLM checkpoints, sized for a 2-core CPU (README, Profiles)",
    "profiles.paper.*.eval_batch_size": "dev/test inference batch of the paper profile's GPU runs; changes no "
                                        "result, only speed (the default 128 suits every profile)",
    "profiles.paper.metakd_stage_b.eval_every": "the authors pick stage B's checkpoint every 50 steps (TinyBERT's "
                                                "eval_step, see params.yaml); Profile's default for stage B keeps "
                                                "TrainSettings' 500",
}

OMITTED = {
    f"profiles.*.{run}.lr_schedule": "only Meta-KD's stages A and B change the schedule; writing the default into "
                                     f"params.yaml would change the tracked value of profiles.<p>.{run} and rerun "
                                     f"those stages for nothing (until then: -S +profiles.<p>.{run}.lr_schedule=...)"
    for run in ("teacher", "student", "meta_teacher")
}


def _default(obj: BaseModel, section_default: BaseModel | None, name: str) -> tuple[bool, Any]:
    """(has a default, the default) of field ``name`` of ``obj``."""
    if section_default is not None:
        return True, getattr(section_default, name)
    field = type(obj).model_fields[name]
    if field.is_required():
        return False, None
    return True, field.get_default(call_default_factory=True)


def compare(raw: dict) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """Keys whose params.yaml value differs from the config default ({key: (value, default)}), and
    settings with a default that params.yaml leaves out, for the raw contents of a params.yaml."""
    differs: dict[str, tuple[Any, Any]] = {}
    omitted: list[str] = []

    def walk(obj: BaseModel, section_default: BaseModel | None, prefix: str) -> None:
        for name in type(obj).model_fields:
            key = prefix + name
            has, default = _default(obj, section_default, name)
            if name not in obj.model_fields_set:
                if has:
                    omitted.append(key)
                continue
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                walk(value, default if isinstance(default, BaseModel) else None, key + ".")
            elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
                for item, section in value.items():  # profiles.<name>, data.<task>: the class defaults
                    walk(section, None, f"{key}.{item}.")
            elif has and value != default:
                differs[key] = (value, default)

    walk(parse_params(raw), None, "")
    return differs, omitted


def _listed(key: str, patterns: dict[str, str]) -> bool:
    return any(fnmatch(key, p) for p in patterns)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def test_params_yaml_values_are_the_config_defaults(raw):
    differs, _ = compare(raw)
    unexplained = {k: v for k, v in differs.items() if not _listed(k, DELIBERATE)}
    assert not unexplained, "\n".join(
        f"params.yaml sets {k}: {v!r} but hrkd/config.py's default is {d!r}: make them agree, or list {k} in "
        "DELIBERATE (tests/test_params_defaults.py) with the reason" for k, (v, d) in unexplained.items())
    unused = [p for p in DELIBERATE if not any(fnmatch(k, p) for k in differs)]
    assert not unused, f"DELIBERATE lists {unused}, which now agree with the config defaults: drop them"


def test_every_setting_with_a_default_is_in_params_yaml(raw):
    _, omitted = compare(raw)
    unexplained = [k for k in omitted if not _listed(k, OMITTED)]
    assert not unexplained, (f"params.yaml leaves out {unexplained} (hrkd/config.py gives them defaults): write them "
                             "in params.yaml with the default value, or list them in OMITTED with the reason")
    unused = [p for p in OMITTED if not any(fnmatch(k, p) for k in omitted)]
    assert not unused, f"OMITTED lists {unused}, which params.yaml now writes: drop them"


def test_the_comparison_sees_a_changed_value_and_a_missing_key(raw):
    changed = copy.deepcopy(raw)
    changed["distill"]["graph_heads"] += 1
    del changed["engine"]["log_every"]
    changed["profiles"]["paper"]["meta_teacher"]["lr"] = 5.0e-5  # the TrainSettings default, not Profile's 2e-5
    differs, omitted = compare(changed)
    assert differs["distill.graph_heads"][0] == raw["distill"]["graph_heads"] + 1
    assert differs["profiles.paper.meta_teacher.lr"] == (5.0e-5, 2.0e-5)
    assert "engine.log_every" in omitted
    assert compare(raw)[0].keys() < differs.keys()
