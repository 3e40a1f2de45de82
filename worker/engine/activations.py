"""Activation units: the elementwise nonlinearities of a traced forward pass, found op by op, and the rule each
one's backward pass gets.

A model's activation is often several ops: ``ReLU(max_value=3)`` is ``Relu`` then a clip, swish is a
``Sigmoid`` and a product, GELU an ``Erfc`` and products, hard-swish ``x * Relu6(x + 3) / 6``, PReLU two
``Relu``s and a scale.  A *unit* is the smallest group of elementwise ops that holds such a nonlinearity and
depends on the rest of the graph through one tensor, its input ``x``; its output ``y = f(x)`` is the one tensor
the rest of the graph reads.  Units are found on the ops the trace created, so Keras 3 and Keras 2 models,
Lambdas and SavedModels look alike.

The rule (``g``: the gradient arriving at ``y``; ``f'(x)``: the unit's own elementwise derivative):

* guided backprop: ``f'(x) * max(g, 0)``; on a ReLU (``f' = [x > 0]``) and ReLU6 (``[0 < x < 6]``) this is
  Springenberg's rule exactly;
* Deconvnet: ``max(g, 0)`` wherever ``f`` is, Zeiler & Fergus's rule on ReLU and ReLU6;
* plain: ``f'(x) * g``, the ordinary gradient.

A unit is given its rule by handing ``y``'s readers ``IdentityN(y, x, f'(x))`` instead of ``y``: that op's
registered gradient (:mod:`worker.engine.ops`) returns the rule's value for ``x`` and nothing for ``y``, so
the gradient reaches ``x`` through the rule alone.  A plain ``Relu``/``Relu6`` op needs none of this: its op
override gives the same values with the framework's fused kernels.

Which units get the method's rule is the ``activations`` option: ``relu`` (default) gives it to units made
only of ReLUs, caps and thresholds (``Relu``, ``Relu6``, ``LeakyRelu``, clips, thresholded selects: ``ReLU``
layers with any ``max_value``, ``threshold`` or ``negative_slope``, leaky ReLU, PReLU); every other unit keeps
the plain gradient, exactly, and is reported.  ``all`` gives the rule to every unit (swish, GELU, hard-swish,
ELU, SELU, sigmoid, tanh, ...).

Examples:
    >>> import keras
    >>> from worker import GuidedBackprop
    >>> x = keras.Input((8, 8, 3))
    >>> h = keras.layers.Activation("swish")(keras.layers.Conv2D(4, 3)(x))
    >>> model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    >>> GuidedBackprop(model, batch_size=1, activations="all").report["coverage"]["guided"]
    {'Mul+Sigmoid': 1}
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

#: elementwise op types a unit may hold (comparisons and selects for thresholds; Identity* for custom gradients)
ELEMENTWISE = {
    "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Erf", "Erfc", "Softplus", "Softsign", "Exp",
    "Expm1", "Abs", "Minimum", "Maximum", "ClipByValue", "Select", "SelectV2", "Greater", "GreaterEqual", "Less",
    "LessEqual", "Mul", "AddV2", "Add", "Sub", "RealDiv", "Neg", "Pow", "Square", "Sqrt", "Rsqrt", "Identity",
    "IdentityN", "Cast", "Snapshot",
}
#: the activations' own nonlinear types (a unit is found from one of these; a product of two live tensors too).
#: Powers, roots and exponentials may sit inside a unit (tanh-GELU's cube) but do not make one: a normalisation's
#: ``Rsqrt`` of a variance is no activation
_UNARY_NONLINEAR = {"Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Erf", "Erfc", "Softplus",
                    "Softsign", "Expm1", "Minimum", "Maximum", "ClipByValue", "Select", "SelectV2"}
#: a unit whose nonlinear ops are all of these is a ReLU: capped, thresholded or with a learnt negative scale
RELU_FAMILY = {"Relu", "Relu6", "LeakyRelu", "Minimum", "Maximum", "ClipByValue", "Select", "SelectV2"}
_PASS_THROUGH = {"Identity", "IdentityN", "Cast", "Snapshot"}
_SEARCH_DEPTH = 6  # elementwise steps back from a nonlinear op to look for its unit's input


@dataclass
class Unit:
    """One activation: ``output = f(input)`` elementwise, computed by ``ops``."""

    input: tf.Tensor
    output: tf.Tensor
    ops: list
    nonlinear: list

    @property
    def kind(self) -> str:
        """The op types of the unit, e.g. ``Maximum+Minimum+Relu`` (a capped ReLU), ``Mul+Sigmoid`` (swish)."""
        return "+".join(sorted({op.type for op in self.ops if op.type not in _PASS_THROUGH}))

    @property
    def is_relu(self) -> bool:
        return {op.type for op in self.nonlinear} <= RELU_FAMILY

    @property
    def is_single_relu(self) -> bool:
        """A lone ``Relu``/``Relu6`` op, which its op override already guides."""
        return len(self.ops) == 1 and self.ops[0].type in ("Relu", "Relu6")


class _Graph:
    """The forward ops with what the rules need: which tensors depend on the input, who reads what."""

    def __init__(self, ops, source: tf.Tensor):
        self.ops = list(ops)
        self.index = {op: i for i, op in enumerate(self.ops)}
        self.live = {source.ref()}
        for op in self.ops:  # creation order is topological
            if any(t.ref() in self.live for t in op.inputs):
                self.live.update(t.ref() for t in op.outputs)

    def live_inputs(self, op):
        return [t for t in op.inputs if t.ref() in self.live]

    def nonlinear(self, op) -> bool:
        if op.type not in ELEMENTWISE or not self.live_inputs(op):
            return False
        if op.type in ("Mul", "Minimum", "Maximum") and len(self.live_inputs(op)) > 1:
            return True  # a product or a max of two live tensors
        if op.type in ("Select", "SelectV2"):
            return op.inputs[0].ref() in self.live  # a live condition: a threshold
        return op.type in _UNARY_NONLINEAR

    def consumers(self, tensor):
        return [op for op in tensor.consumers() if op in self.index]

    def read(self, op) -> bool:
        """Whether any output of ``op`` is read (an unread Identity beside a custom gradient is not)."""
        return any(t.consumers() for t in op.outputs)

    def region(self, root: tf.Tensor) -> list:
        """Every elementwise op that depends on the live graph only through ``root`` (in creation order)."""
        inside = {root.ref()}
        members: set = set()
        frontier = [root]
        while frontier:
            tensor = frontier.pop()
            for op in self.consumers(tensor):
                if op in members or op.type not in ELEMENTWISE:
                    continue
                if all(t.ref() in inside for t in self.live_inputs(op)):
                    members.add(op)
                    inside.update(t.ref() for t in op.outputs)
                    frontier.extend(op.outputs)
        return sorted(members, key=self.index.get)

    def candidates(self, op):
        """Tensors ``op`` may be the unit of: its live inputs, then theirs through elementwise ops, nearest first."""
        seen, order, frontier = set(), [], self.live_inputs(op)
        for _ in range(_SEARCH_DEPTH):
            nxt = []
            for t in frontier:
                if t.ref() in seen:
                    continue
                seen.add(t.ref())
                order.append(t)
                if t.op in self.index and t.op.type in ELEMENTWISE:
                    nxt.extend(self.live_inputs(t.op))
            frontier = nxt
        return order


def find_units(ops, source: tf.Tensor) -> tuple[list[Unit], list]:
    """The activation units among ``ops`` (a forward pass's ops, in creation order) whose inputs depend on
    ``source``, and the nonlinear ops that belong to no unit (an intermediate read outside, say)."""
    graph = _Graph(ops, source)
    nonlinear = [op for op in graph.ops if graph.nonlinear(op)]
    roots: dict = {}
    for op in nonlinear:
        root = next((t for t in graph.candidates(op) if op in graph.region(t)), None)
        if root is not None:
            roots.setdefault(root.ref(), root)
    found = [u for u in (_unit(graph, root, graph.region(root)) for root in roots.values()) if u is not None]
    # a unit inside a larger one (a capped ReLU's Relu inside the cap's unit) is part of it
    units = [u for u in found if not any(u is not v and set(u.ops) < set(v.ops) for v in found)]
    covered = {op for u in units for op in u.ops}
    unplaced = []
    for op in nonlinear:
        if op in covered:
            continue
        if op.type in ("Relu", "Relu6"):  # beside another activation on one tensor: still a ReLU on its own
            units.append(Unit(graph.live_inputs(op)[0], op.outputs[0], [op], [op]))
        else:
            unplaced.append(op)
    return sorted(units, key=lambda u: graph.index[u.output.op]), unplaced


def _unit(graph: _Graph, root, region) -> Unit | None:
    """The unit of ``root``: its region's one tensor read elsewhere (linear ops after the last nonlinear one left
    out), and the region's ops that tensor depends on; None when the region is not one function of ``root``."""
    members = set(region)
    read_outside = [t for op in region for t in op.outputs
                    if t.ref() in graph.live and any(c not in members for c in graph.consumers(t))]
    if len(read_outside) > 1:
        return None
    output = read_outside[0] if read_outside else region[-1].outputs[0]
    # a scale or shift after the activation is the next layer's business (it is linear)
    while (output.op in members and not graph.nonlinear(output.op) and output.op.type not in _PASS_THROUGH
           and len(graph.live_inputs(output.op)) == 1 and graph.live_inputs(output.op)[0].op in members
           and len(graph.consumers(graph.live_inputs(output.op)[0])) == 1):
        output = graph.live_inputs(output.op)[0]
    ops, frontier = set(), [output.op]
    while frontier:
        op = frontier.pop()
        if op in members and op not in ops:
            ops.add(op)
            frontier.extend(t.op for t in graph.live_inputs(op))
    nonlinear = [op for op in region if graph.nonlinear(op)]
    if not set(nonlinear) <= ops:
        return None  # two activations side by side on one tensor: not one unit
    for op in ops:
        for t in op.outputs:
            if t is not output and t.ref() in graph.live and any(c not in ops and graph.read(c)
                                                                 for c in graph.consumers(t)):
                return None  # an intermediate tensor is read outside: the unit is not one function of its input
    return Unit(root, output, sorted(ops, key=graph.index.get), nonlinear)


def apply_rule(unit: Unit, rule: str) -> tf.Tensor:
    """Hand ``unit.output``'s readers ``IdentityN(y, x, f'(x))`` with the gradient ``rule`` (an op name
    registered in :mod:`worker.engine.ops`); returns the new output."""
    from worker.engine.ops import plain_relu_gradients

    y, x = unit.output, unit.input
    readers = [(op, i) for op in y.consumers() for i, t in enumerate(op.inputs) if t is y]
    with plain_relu_gradients():  # f'(x): the unit's own ordinary derivative
        derivative = tf.gradients(y, x, stop_gradients=[x])[0]
    if derivative is None:
        derivative = tf.zeros_like(x)
    graph = tf.compat.v1.get_default_graph()
    with graph.gradient_override_map({"IdentityN": rule}):
        ruled = tf.raw_ops.IdentityN(input=[y, x, tf.cast(derivative, x.dtype)], name="activation_rule")[0]
    for op, i in readers:
        op._update_input(i, ruled)  # noqa: SLF001 - the one way to re-route a traced graph's readers
    return ruled
