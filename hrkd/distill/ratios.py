"""The relational graph of a student outside the training loop: its construction arguments, eq. 6's
prototypes, its state on disk and the ratios of Tables 5-6.

The report reads trained ratios through this module alone: it needs neither the trainer nor the
teachers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from hrkd.config import Distill
from hrkd.data.loading import Batch
from hrkd.distill.batches import DistillBatch, concat_domain_batches
from hrkd.errors import HRKDError
from hrkd.io import atomic_dir, read_json, write_json
from hrkd.models import MultiDomainBert, Taps
from hrkd.registry import METHODS
from hrkd.relational import HierarchicalRelational, layer_prototypes, ratio_diagnostics, stack_domain_prototypes

RELATIONAL_DIR = "_relational"  # student encoder + graph state, for Tables 5-6
GRAPH_FILE = "graph.pt"
PROJ_FILE = "projections.pt"  # W^embd, W_m^hidn, saved when prototypes are projected
GRAPH_META = "relational.json"


def ratio_learning(method: str, distill: Distill) -> str:
    """How the method's graph learns: ``paper``, ``frozen`` or ``dro`` (``distill.ratios`` unless fixed)."""
    return METHODS[method].ratios or distill.ratios


def graph_arguments(method: str, distill: Distill, num_layers: int, num_domains: int, feature_dim: int) -> dict[str, Any]:
    """Constructor arguments of the method's graph (JSON-able, saved next to its state)."""
    learning = ratio_learning(method, distill)
    m = METHODS[method]
    return {
        "num_layers": num_layers,
        "num_domains": num_domains,
        "feature_dim": feature_dim,
        "graph_hidden": distill.graph_hidden,
        "graph_heads": distill.graph_heads,
        "dropout": distill.graph_dropout,
        "self_attention": m.self_attention,
        "comp_agg": m.comp_agg,
        "hierarchical": m.hierarchical,
        # dro needs the skip term: without it r is exactly 1/D whenever a layer's scores share a
        # sign, and has no gradient there to learn from.
        "graph_skip": distill.graph_skip or learning == "dro",
        # dro also drops the ELU on the graph's output: under the KL pull toward uniform, training
        # drives every node's layer-2 input far below 0, where ELU = -1 exactly (r = 1/D to fp32)
        # and its gradient exp(x) vanishes, so r stays uniform for good (docs/hrkd-method.md).
        "graph_output_elu": learning != "dro",
        "ratios": learning,
        "dro_tau": distill.dro_tau,
        "prototype_features": distill.prototype_features,
    }



def _graph_ctor(args: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("num_layers", "num_domains", "feature_dim", "graph_hidden", "graph_heads", "dropout",
            "self_attention", "comp_agg", "hierarchical", "graph_skip")
    # Graphs saved before graph_output_elu existed all had the ELU on their output.
    return {**{k: args[k] for k in keys}, "graph_output_elu": args.get("graph_output_elu", True)}


def domain_prototypes(student_out, db: DistillBatch, padding: bool, proj: Sequence[nn.Module] | None = None) -> Tensor:
    """Eq. 6 for every domain's rows of a step: [M+1, D, F] in fp32.

    ``proj``: W^embd, W_1^hidn..W_M^hidn; given, layer m's prototype averages proj[m]'s outputs
    (the authors' code) instead of the raw student outputs (the paper).

    ``padding`` True averages over all positions of the step's padded width (eq. 6 as written;
    the authors pad to a fixed 128, we to the step's longest row);
    False over real tokens only.
    """
    mask = db.batch.attention_mask
    layers = [student_out.embeddings, *student_out.hidden_states]
    if proj is not None:
        layers = [p(x) for p, x in zip(proj, layers)]
    return stack_domain_prototypes([
        layer_prototypes(layers[0][a:z].float(), [h[a:z].float() for h in layers[1:]], None if padding else mask[a:z])
        for a, z in db.spans
    ])


def _taps(hidden: bool, layers):
    return Taps(hidden=hidden, attention_layers=frozenset(int(n) for n in layers))


def save_relational(objective, out_dir: str | Path, tokenizer, metadata: Mapping[str, Any]) -> Path:
    """Write a KDObjective's student encoder, graph state and graph arguments (no teacher needed to reload)."""

    if objective.graph is None or objective.graph_args is None:
        raise HRKDError(f"method '{objective.method}' has no relational graph to save")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        objective.student.encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({k: v.detach().cpu() for k, v in objective.graph.state_dict().items()}, tmp / GRAPH_FILE)
        if objective.graph_args.get("prototype_features") == "projected":
            torch.save({k: v.detach().cpu() for k, v in objective.proj.state_dict().items()}, tmp / PROJ_FILE)
        write_json(tmp / GRAPH_META, {"graph": objective.graph_args, "method": objective.method,
                                      "prototype_padding": objective.prototype_padding, **metadata})
    return out_dir


@dataclass
class _RelationalProbe:
    student: nn.Module
    graph: HierarchicalRelational
    prototype_padding: bool
    domains: list[str] | None
    proj: nn.ModuleList | None = None


def load_relational(path: str | Path) -> _RelationalProbe:
    """Reload a saved student encoder + graph (``<student out>/_relational`` or that folder itself)."""
    path = Path(path)
    if not (path / GRAPH_META).is_file() and (path / RELATIONAL_DIR / GRAPH_META).is_file():
        path = path / RELATIONAL_DIR
    if not (path / GRAPH_META).is_file() or not (path / GRAPH_FILE).is_file():
        raise HRKDError(f"{path} holds no relational state ({GRAPH_META}, {GRAPH_FILE}): distill an HRKD-method student first")
    meta = read_json(path / GRAPH_META)
    with torch.random.fork_rng(devices=[]):
        student = MultiDomainBert.from_pretrained(path, num_labels=1, domains=None)  # head unused
        graph = HierarchicalRelational(**_graph_ctor(meta["graph"]))
    graph.load_state_dict(torch.load(path / GRAPH_FILE, map_location="cpu", weights_only=True))
    proj = None
    if meta["graph"].get("prototype_features") == "projected":
        width = int(meta["graph"]["feature_dim"])
        proj = nn.ModuleList(nn.Linear(student.hidden_size, width) for _ in range(student.num_layers + 1))
        proj.load_state_dict(torch.load(path / PROJ_FILE, map_location="cpu", weights_only=True))
        proj.eval()
    return _RelationalProbe(student.eval(), graph.eval(), bool(meta["prototype_padding"]), meta.get("domains"), proj)


def relational_ratios(objective_or_saved_dir: Any,
                      batches_per_domain: Mapping[str, Batch] | Sequence[Batch], *,
                      graph_dropout: bool = False) -> dict[str, Any]:
    """Domain-relational ratios r [M+1, D] and hierarchical similarity ratios (Tables 5-6), dropout off.

    ``graph_dropout=True`` keeps the graph's dropout on (the authors compute r in train mode):
    comparing the two shows how much of r is dropout noise (docs/hrkd-method.md, ratio collapse).

    ``batches_per_domain``: one batch of examples per domain, in the graph's domain order (a
    mapping is read in insertion order, or in the saved domain order when its keys are those
    names). Rows are padded to a common width and averaged as in training (eq. 6).
    Returns tensors on the CPU: ``ratios`` [M+1, D], ``similarity`` (list of M+1 [D, m+1]),
    ``domain_attention`` [M+1, D, D], plus ``diagnostics`` (:func:`ratio_diagnostics`) and ``domains``.
    """
    if isinstance(objective_or_saved_dir, nn.Module):  # a KDObjective with a graph
        obj = objective_or_saved_dir
        if obj.graph is None:
            raise HRKDError(f"method '{obj.method}' has no relational graph; pass an HRKD-method objective")
        projected = obj.graph_args is not None and obj.graph_args.get("prototype_features") == "projected"
        probe = _RelationalProbe(obj.student, obj.graph, obj.prototype_padding, getattr(obj.student, "domains", None),
                                 obj.proj if projected else None)
    else:
        probe = load_relational(objective_or_saved_dir)
    domains = probe.domains
    if isinstance(batches_per_domain, Mapping):
        names = list(batches_per_domain)
        if domains is not None and sorted(names) == sorted(domains):
            names = list(domains)
        batches = [batches_per_domain[n] for n in names]
        domains = names
    else:
        batches = list(batches_per_domain)
    if len(batches) != probe.graph.num_domains:
        raise HRKDError(f"got batches for {len(batches)} domains but the graph has {probe.graph.num_domains}; pass one per domain")
    device = next(probe.student.parameters()).device
    if probe.proj is not None:
        probe.proj.to(device)
    db = concat_domain_batches([b.to(device) for b in batches])
    modes = (probe.student.training, probe.graph.training)
    probe.student.eval()
    probe.graph.train(graph_dropout)
    try:
        with torch.no_grad():
            b = db.batch
            out = probe.student(b.input_ids, b.attention_mask, b.token_type_ids,
                                domain=0 if len(probe.student.heads) > 1 else None, taps=_taps(True, ()))
            protos = domain_prototypes(out, db, probe.prototype_padding, probe.proj)
            with torch.autocast(device.type, enabled=False):
                rel = probe.graph(protos)
    finally:
        probe.student.train(modes[0])
        probe.graph.train(modes[1])
    ratios = rel.ratios.float().cpu()
    return {
        "domains": domains,
        "ratios": ratios,
        "similarity": [s.float().cpu() for s in rel.similarity],
        "domain_attention": rel.domain_attention.float().cpu(),
        "diagnostics": ratio_diagnostics(ratios),
    }
