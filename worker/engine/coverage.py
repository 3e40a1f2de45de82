"""Which nonlinearities of a traced model were guided: the coverage report.

Guided backprop is exact only if *every* ReLU is guided.  After the model is
traced inside :func:`worker.engine.ops.guided_scope`, we walk the ops the model
created: each lone ``Relu``/``Relu6`` must carry the guided gradient tag; a ReLU
hidden in a function body the override cannot reach (a ``tf.function`` called
from a custom layer, a conditional's branch, say) is listed as unguided.  Activations made of several ops
(:mod:`worker.engine.activations`) are counted by kind under ``guided`` when they
got the method's rule and under ``vanilla`` when they kept the plain gradient;
a nonlinear op that belongs to no unit is listed as ``unresolved``.  Other
nonlinear op types are counted as ``other_nonlinearities`` so a user knows what
the map passes through.  ``ops`` counts every op type the compiled function runs (checked against
:mod:`worker.engine.allowlist`), and ``opted_in`` names those outside the allowlist that ran only because
the caller passed ``allow_side_effects``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from worker.engine.allowlist import called_functions, walk_functions
from worker.engine.ops import GUIDED_OVERRIDES, OTHER_NONLINEARITIES, gradient_tag


@dataclass
class CoverageReport:
    guided: dict[str, int] = field(default_factory=dict)
    unguided: list[str] = field(default_factory=list)
    other_nonlinearities: dict[str, int] = field(default_factory=dict)
    vanilla: dict[str, int] = field(default_factory=dict)  # activation units that kept the plain gradient
    unresolved: list[str] = field(default_factory=list)  # nonlinear ops in no unit (products of two branches too)
    activations: str = "relu"
    ops: dict[str, int] = field(default_factory=dict)  # op type -> count in the traced graph and its functions
    opted_in: dict[str, list[str]] = field(default_factory=dict)  # outside the allowlist, run by the opt-in

    @property
    def guided_total(self) -> int:
        return sum(self.guided.values())

    def problems(self) -> list[str]:
        """Why a guided map of this model would not be exact (empty when it is)."""
        found = []
        if self.unguided:
            shown = ", ".join(self.unguided[:10]) + (" ..." if len(self.unguided) > 10 else "")
            found.append(f"{len(self.unguided)} ReLU op(s) could not be guided: {shown}")
        if self.unresolved:
            shown = ", ".join(self.unresolved[:5]) + (" ..." if len(self.unresolved) > 5 else "")
            found.append(f"{len(self.unresolved)} nonlinear op(s) belong to no activation the engine could isolate "
                         f"(an intermediate is read elsewhere) and keep their plain gradient: {shown}")
        if self.vanilla:
            kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.vanilla.items()))
            found.append(f"{sum(self.vanilla.values())} activation(s) that are not ReLUs keep their plain gradient "
                         f"({kinds}); activations='all' (CLI: --activations all) gives them the method's rule")
        if self.guided_total == 0:
            found.append("the model has no ReLU: its guided map would equal the plain gradient"
                         + ("" if self.vanilla else "; activations='all' guides other activations"))
        return found

    def to_dict(self) -> dict:
        return {**asdict(self), "guided_total": self.guided_total}


def inspect_ops(ops, graph, overrides: dict[str, str] | None = None, ruled: dict | None = None,
                activations: str = "relu") -> CoverageReport:
    """Report on ``ops`` (the ops a model's forward pass created in ``graph``): which ReLU-family ops carry the
    gradient ``overrides`` gives their type (default: guided backprop's), and which rule each activation unit
    got (``ruled``: ``{"units": [(unit, rule)], "unplaced": [op]}`` from the method)."""
    from worker.engine.ops import PLAIN_UNIT

    overrides = overrides or GUIDED_OVERRIDES
    ruled = ruled or {"units": [], "unplaced": []}
    guided: Counter = Counter()
    vanilla: Counter = Counter()
    other: Counter = Counter()
    unguided: list[str] = []
    called: set[str] = set()
    inside = set()
    for unit, rule in ruled["units"]:
        (vanilla if rule == PLAIN_UNIT else guided)[unit.kind] += 1
        inside.update(unit.ops)
    # a product of two branches (a squeeze-excite gate) is no activation: it keeps its gradient, unlisted
    unresolved = [op.name for op in ruled["unplaced"] if op.type != "Mul"]
    for op in ops:
        if op in inside:
            continue
        if op.type in GUIDED_OVERRIDES:
            if gradient_tag(op) == overrides.get(op.type):
                guided[op.type] += 1
            else:
                unguided.append(op.name)
        elif op.type in OTHER_NONLINEARITIES:
            other[op.type] += 1
        else:
            called.update(called_functions(op.node_def))
    if called:
        library = {f.signature.name: f for f in graph.as_graph_def().library.function}
        for name, _, node in walk_functions(((f, None) for f in called), library):
            if node.op in GUIDED_OVERRIDES:
                unguided.append(f"{name}/{node.name}")
            elif node.op in OTHER_NONLINEARITIES:
                other[node.op] += 1
    return CoverageReport(dict(guided), unguided, dict(other), dict(vanilla), unresolved, activations)
