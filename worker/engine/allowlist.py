"""The op types a classifier computes with: every graph the engine runs is checked against them before the
first image.

A model is a program.  A SavedModel (or any traced graph) can hold ops that touch the outside world with no
Python behind them: write, read or list files, print to a file, save tensors, start a dataset, call back into
Python.  :func:`check_saved_model` checks what loading a SavedModel would run, before it is loaded, and
:func:`check_graph` walks a traced graph -- its own ops, then every function they call, the branches
of every conditional and the bodies of every loop, to any depth -- and compares each op type with
:data:`ALLOWED`, a list of pure computation grouped by what it is for.  Anything else is refused in one line
naming the op types and where they sit, unless the caller passed ``allow_side_effects=True`` (CLI:
``--allow-side-effects``) for a model they trust.

It is an allowlist: an op type that is not named here, whatever a later TensorFlow calls it, is refused until
someone has read what it does and added it.  ``Empty`` (a tensor of uninitialised memory, which could then reach
a written map) is not in it: neither Keras nor TensorFlow's layers emit it.

Memory is not bounded here: pure ops that take a shape as a tensor (``Fill``, ``Tile``, ``BroadcastTo``,
``Range``, ``TensorListReserve``, ...) can still ask for a very large tensor; the allocation then fails the
batch.  How much memory a worker may use is the operator's limit to set.

Loops: a classifier needs none, and a model's loop (``While``; TF1's ``Enter``/``Exit``/``NextIteration``) is
the one way a graph of pure ops can run for ever.  So a loop inside the model is refused too (the same opt-in
allows it); loops the engine adds itself (SmoothGrad's per-image noise) are allowed where they sit outside the
model's forward pass.

Examples:
    >>> import tensorflow as tf
    >>> f = tf.function(lambda x: tf.nn.relu(x) * 2.0).get_concrete_function(tf.TensorSpec((1, 4)))
    >>> sorted(check_graph(f.graph).seen)
    ['Const', 'Identity', 'Mul', 'Placeholder', 'Relu']
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from worker.engine.models import ModelLoadError

SIDE_EFFECTS_OPT_IN = "allow_side_effects=True (CLI: --allow-side-effects)"

#: structure of a graph: constants, inputs, identities, checks that fail the batch (``Assert``), the reads of the
#: model's own variables, function calls and conditionals (whose functions are checked in turn)
STRUCTURE = {
    "Const", "Placeholder", "PlaceholderWithDefault", "Identity", "IdentityN", "NoOp", "Snapshot",
    "StopGradient", "PreventGradient", "EnsureShape", "Assert", "ReadVariableOp", "ResourceGather",
    "PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf", "Case", "StatelessCase", "Switch", "Merge",
}
#: element-wise and reducing arithmetic, comparisons and logic
MATH = {
    "Abs", "Acos", "Acosh", "Add", "AddN", "AddV2", "All", "Any", "ApproximateEqual", "ArgMax", "ArgMin", "Asin",
    "Asinh", "Atan", "Atan2", "Atanh", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "BiasAdd", "BiasAddV1",
    "Cast", "Ceil", "ClipByValue", "Cos", "Cosh", "Cumprod", "Cumsum", "Digamma", "Div", "DivNoNan", "Einsum",
    "Equal", "Erf", "Erfc", "Erfinv", "Exp", "Expm1", "Floor", "FloorDiv", "FloorMod", "Greater", "GreaterEqual",
    "Inv", "IsFinite", "IsInf", "IsNan", "Less", "LessEqual", "Lgamma", "Log", "Log1p", "LogicalAnd",
    "LogicalNot", "LogicalOr", "MatMul", "Max", "Maximum", "Mean", "Min", "Minimum", "Mod", "Mul", "MulNoNan",
    "Ndtri", "Neg", "NextAfter", "NotEqual", "Pow", "Prod", "Range", "RealDiv", "Reciprocal", "Rint", "Round",
    "Rsqrt", "Select", "SelectV2", "Sigmoid", "Sign", "Sin", "Sinh", "Sqrt", "Square", "SquaredDifference",
    "Sub", "Sum", "Tan", "Tanh", "TruncateDiv", "TruncateMod", "Xdivy", "Xlog1py", "Xlogy", "LinSpace",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor", "LeftShift", "RightShift", "Invert",
}
#: neural-network layers: convolutions, pooling, normalisation, activations
NN = {
    "AvgPool", "AvgPool3D", "BatchNormWithGlobalNormalization", "Conv", "Conv2D", "Conv2DBackpropInput",
    "Conv2DBackpropInputV2", "Conv3D", "Conv3DBackpropInputV2", "DepthwiseConv2dNative",
    "DepthwiseConv2dNativeBackpropInput", "Dilation2D", "Elu", "FusedBatchNorm", "FusedBatchNormV2",
    "FusedBatchNormV3", "FusedConv2DBiasActivation", "_FusedConv2D", "_FusedMatMul", "InTopKV2", "L2Loss",
    "LRN", "LeakyRelu", "LogSoftmax", "MaxPool", "MaxPool3D", "MaxPoolV2", "MaxPoolWithArgmax", "Relu", "Relu6",
    "Selu", "Softmax", "Softplus", "Softsign", "TopKV2", "Gelu",
}
#: shapes, slices, joins, gathers and reorderings of tensors (TensorLists are in-memory arrays)
ARRAY = {
    "BatchToSpaceND", "BroadcastArgs", "BroadcastGradientArgs", "BroadcastTo", "CheckNumerics", "Concat",
    "ConcatOffset", "ConcatV2", "ConjugateTranspose", "DepthToSpace", "DynamicStitch",
    "ExpandDims", "ExtractImagePatches", "Fill", "Gather", "GatherNd", "GatherV2", "InvertPermutation",
    "MatrixBandPart", "MatrixDiagPartV3", "MatrixDiagV3", "MatrixSetDiagV3", "MirrorPad", "OneHot", "OnesLike",
    "Pack", "Pad", "PadV2", "Rank", "Reshape", "Reverse", "ReverseV2", "Roll", "ScatterNd", "Shape", "ShapeN",
    "Size", "Slice", "SpaceToBatchND", "SpaceToDepth", "Split", "SplitV", "Squeeze", "StridedSlice", "Tile",
    "TensorScatterAdd", "TensorScatterUpdate", "Transpose", "Unique", "Unpack", "UnsortedSegmentSum",
    "UnsortedSegmentMax", "Where", "ZerosLike", "TensorListReserve", "TensorListFromTensor",
    "TensorListGetItem", "TensorListSetItem", "TensorListStack", "TensorListElementShape", "TensorListLength",
    "TensorListPushBack", "TensorListPopBack", "EmptyTensorList", "TensorListConcatV2", "TensorListSplit",
    "TensorListGather", "TensorListScatterIntoExistingList", "TensorListResize",
}
#: image resizing (a model's own Resizing layer, the engine's input resize)
IMAGE = {
    "ResizeArea", "ResizeBicubic", "ResizeBilinear", "ResizeNearestNeighbor", "ScaleAndTranslate",
    "CropAndResize", "AdjustContrastv2", "RGBToHSV", "HSVToRGB",
}
#: what the methods add: the backward pass of the ops above, and SmoothGrad's seeded noise
METHODS = {
    "AvgPool3DGrad", "AvgPoolGrad", "BiasAddGrad", "Conv2DBackpropFilter", "Conv3DBackpropFilterV2",
    "DepthwiseConv2dNativeBackpropFilter", "EluGrad", "FusedBatchNormGrad", "FusedBatchNormGradV2",
    "FusedBatchNormGradV3", "InvGrad", "LRNGrad", "LeakyReluGrad", "MaxPool3DGrad", "MaxPoolGrad",
    "MaxPoolGradV2", "MaxPoolGradGrad", "MaxPoolGradGradV2", "MaxPoolGradWithArgmax", "MirrorPadGrad",
    "ReciprocalGrad", "Relu6Grad", "ReluGrad", "ResizeBicubicGrad", "ResizeBilinearGrad",
    "ResizeNearestNeighborGrad", "RsqrtGrad", "SeluGrad", "SigmoidGrad", "SoftplusGrad", "SoftsignGrad",
    "SqrtGrad", "StridedSliceGrad", "TanhGrad", "ScaleAndTranslateGrad", "TensorScatterSub",
    "StatelessRandomGetKeyCounter", "StatelessRandomNormalV2", "StatelessRandomNormal",
    "StatelessRandomUniformV2", "StatelessRandomUniform",
}
#: loops: allowed where the engine adds them, refused inside the model (a classifier needs none)
LOOPS = {"While", "StatelessWhile", "Enter", "Exit", "NextIteration", "LoopCond"}

#: every op type allowed anywhere, by category (loops: see LOOPS)
ALLOWED = {"structure": STRUCTURE, "math": MATH, "nn": NN, "array": ARRAY, "image": IMAGE, "methods": METHODS}
_ALLOWED_TYPES = frozenset().union(*ALLOWED.values())


class SideEffectError(ModelLoadError):
    """A graph the engine would run holds op types outside the allowlist (or a loop inside the model)."""


@dataclass
class OpInventory:
    """What :func:`check_graph` found: op type -> count over the graph and every function it calls
    (``seen``), and the op types it let through only because of the opt-in (``opted_in``: type -> where)."""

    seen: dict[str, int] = field(default_factory=dict)
    opted_in: dict[str, list[str]] = field(default_factory=dict)


def check_graph(graph, model_ops=None, *, allow_side_effects: bool = False, what: str = "the model") -> OpInventory:
    """Check every op ``graph`` (a traced ``FuncGraph``) would run against the allowlist.

    ``model_ops``: the ops of the model's forward pass (default: all of them); a loop among them, or in a
    function one of them calls, is refused, while a loop elsewhere (the engine's own) is allowed.  Raises
    :class:`SideEffectError` in one line unless ``allow_side_effects``; returns the :class:`OpInventory`."""
    model_names = None if model_ops is None else {op.name for op in model_ops}
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    nodes = ((op.type, _scope(op.name), called_functions(op.node_def),
              model_names is None or op.name in model_names, False) for op in graph.get_operations())
    seen: Counter = Counter()
    outside: dict[str, list[str]] = {}
    _inspect(nodes, library, what, seen, outside)
    return _verdict(seen, outside, allow_side_effects, what)


def check_saved_model(path: str, *, allow_side_effects: bool = False) -> OpInventory:
    """Check what loading the SavedModel at ``path`` may run, before it is loaded, as TensorFlow's loader
    decides it.

    A TF2 file (one meta graph with an object graph): every function of its library and every function those
    call, except the ones the loader only wraps as callables and never runs -- the restored functions (the
    serving signature among them: :func:`check_graph` checks it once traced) and what only the graph's nodes
    call (the TF1-compatible saver and signatures; the loader restores the variables with its own ops).  So a
    resource's ``_create_resource``, ``_initialize`` and ``_destroy_resource``, a saveable's save and restore
    functions, and a function nothing names are checked.

    A TF1 file (any other, as for TensorFlow's loader), in each meta graph: the ops the loader runs -- the
    init op (``__saved_model_init_op``, ``main_op``, ``legacy_init_op``), the table and local-variable
    initialisers, and the saver's restore op, which may only read the variables from the file the loader
    names and assign them -- and every function of its library."""
    saved = _read_saved_model(path)
    what = f"SavedModel {path} (when loaded)"
    seen: Counter = Counter()
    outside: dict[str, list[str]] = {}
    if len(saved.meta_graphs) == 1 and saved.meta_graphs[0].HasField("object_graph_def"):
        parts = [_tf2_load_time(saved.meta_graphs[0], what)]
    else:
        parts = [_tf1_load_time(meta) for meta in saved.meta_graphs]
    for nodes, library in parts:
        _inspect(nodes, library, what, seen, outside)
    return _verdict(seen, outside, allow_side_effects, what)


def _read_saved_model(path: str):
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    pb = os.path.join(path, "saved_model.pb")
    if not os.path.exists(pb):  # a text SavedModel: read by TensorFlow's loader
        from google.protobuf import text_format

        with open(os.path.join(path, "saved_model.pbtxt")) as f:
            text_format.Parse(f.read(), saved)
    else:
        with open(pb, "rb") as f:
            saved.ParseFromString(f.read())
    return saved


def _tf2_load_time(meta, what: str):
    """(nodes, library) of what loading the TF2 meta graph ``meta`` may run (see :func:`check_saved_model`)."""
    library = {f.signature.name: f for f in meta.graph_def.library.function}
    objects = meta.object_graph_def.nodes

    def functions(node_id: int) -> list[str]:
        target = objects[node_id]
        kind = target.WhichOneof("kind")
        if kind == "function":
            return list(target.function.concrete_functions)
        return [target.bare_concrete_function.concrete_function_name] if kind == "bare_concrete_function" else []

    run = []  # (function, where): bound to what the loader calls
    for obj in objects:
        if obj.WhichOneof("kind") == "resource":
            run.extend((name, f"loading: {child.local_name}") for child in obj.children
                       for name in functions(child.node_id))
        for key, saveable in obj.saveable_objects.items():
            run.extend((name, f"loading: {key} ({role})") for node_id, role in
                       ((saveable.save_function, "save"), (saveable.restore_function, "restore"))
                       for name in functions(node_id))
    bound = {name for name, _ in run}
    wrapped = {name for node_id in range(len(objects)) for name in functions(node_id)} - bound
    wrapped.update(name for node in meta.graph_def.node for name in called_functions(node))
    only_wrapped = {name for name, _, _ in walk_functions(((n, None) for n in wrapped - bound), library, what)}
    run.extend((name, "loading: the function library") for name in library
               if name not in only_wrapped and name not in bound)
    return [("PartitionedCall", where, [name], True, False) for name, where in run], library


def _tf1_load_time(meta):
    """(nodes, library) of what loading the TF1 meta graph ``meta`` may run (see :func:`check_saved_model`)."""
    from tensorflow.core.framework import variable_pb2

    library = {f.signature.name: f for f in meta.graph_def.library.function}
    by_name = {n.name: n for n in meta.graph_def.node}
    init = [name for key in _LOAD_TIME_COLLECTIONS if key in meta.collection_def
            for name in meta.collection_def[key].node_list.value]
    if _INIT_OP_KEY in meta.signature_def and _INIT_OP_KEY in meta.signature_def[_INIT_OP_KEY].outputs:
        init.append(meta.signature_def[_INIT_OP_KEY].outputs[_INIT_OP_KEY].name)
    if "local_variables" in meta.collection_def:
        for raw in meta.collection_def["local_variables"].bytes_list.value:
            variable = variable_pb2.VariableDef()
            variable.ParseFromString(raw)
            init.append(variable.initializer_name)
    nodes = [(n.op, f"loading: {_scope(n.name)}", called_functions(n), True, False)
             for n in _closure(by_name, init)]
    if meta.saver_def.restore_op_name:  # the loader runs the restore op
        filename = _node_name(meta.saver_def.filename_tensor_name)
        for n in _closure(by_name, [meta.saver_def.restore_op_name]):
            # variables read from the file the loader names and assigned: nothing else
            restores = n.op in _RESTORE and (n.op != "RestoreV2" or _node_name(n.input[0]) == filename)
            nodes.append((n.op, f"loading: {_scope(n.name)}", called_functions(n), True, restores))
    nodes.extend(("PartitionedCall", "loading: the function library", [name], True, False) for name in library)
    return nodes, library


def _node_name(tensor: str) -> str:
    return tensor.split(":")[0].lstrip("^")


def _closure(by_name: dict, names: list[str]):
    """The graph nodes ``names`` and every node they depend on."""
    pending = [_node_name(n) for n in names]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        yield by_name[name]
        pending.extend(_node_name(i) for i in by_name[name].input)


#: a TF1 meta graph's init ops: the signature-def entry and the collections the loader reads
_INIT_OP_KEY = "__saved_model_init_op"
_LOAD_TIME_COLLECTIONS = ("saved_model_main_op", "legacy_init_op", "table_initializer")
#: what a TF1 restore op may do: read the variables from the file the loader names, and assign them
_RESTORE = {"RestoreV2", "Assign", "AssignVariableOp", "VariableV2", "VarHandleOp"}


def _inspect(nodes, library: dict, what: str, seen: Counter, outside: dict) -> None:
    """Walk ``nodes`` ((op type, where, functions called, in the model?, vetted by the caller?)) and every
    function of ``library`` they call, to any depth: count each op type in ``seen`` and add each one outside the
    allowlist to ``outside`` (type -> where)."""
    def visit(op_type: str, where: str, in_model: bool, vetted: bool = False) -> None:
        seen[op_type] += 1
        if not vetted and op_type not in _ALLOWED_TYPES and not (op_type in LOOPS and not in_model):
            outside.setdefault(op_type, []).append(where)

    calls = []  # (function name, in the model?): a function reached from the model counts as the model's
    for op_type, where, functions, in_model, vetted in nodes:
        visit(op_type, where, in_model, vetted)
        calls.extend((name, in_model) for name in functions)
    for name, in_model, node in walk_functions(calls, library, what):
        visit(node.op, f"function {name}/{_scope(node.name) or node.name}", in_model)


def _verdict(seen: Counter, outside: dict, allow_side_effects: bool, what: str) -> OpInventory:
    """Raise in one line for op types ``outside`` the allowlist unless ``allow_side_effects``; else the
    :class:`OpInventory`."""
    if outside and not allow_side_effects:
        found = "; ".join(f"{op_type} at {', '.join(dict.fromkeys(places))[:200]}"
                          for op_type, places in sorted(outside.items()))
        raise SideEffectError(
            f"{what} holds op types that are not pure computation (file, network or dataset I/O, save/restore, "
            f"print, Python callbacks, loops): {found}. Only for a model you trust, pass {SIDE_EFFECTS_OPT_IN}.")
    return OpInventory(dict(sorted(seen.items())),
                       {t: list(dict.fromkeys(p))[:10] for t, p in sorted(outside.items())})


def walk_functions(calls, library: dict, what: str = "the model"):
    """Every node of the functions ``calls`` names (``(function name, tag)`` pairs) and of every function they
    call -- through any function attribute: calls, branches, loop bodies -- to any depth, a callee taking its
    caller's tag: yields ``(function name, tag, NodeDef)``, each function once per tag.  ``library``: function
    name -> ``FunctionDef``.  A called function missing from ``library`` cannot be inspected: raises
    :class:`SideEffectError` naming it."""
    pending = list(calls)
    walked: set = set()
    while pending:
        name, tag = pending.pop()
        if (name, tag) in walked:
            continue
        walked.add((name, tag))
        if name not in library:
            raise SideEffectError(f"{what} calls function {name}, which is not in its function library, so it "
                                  "cannot be checked; save the model again with TensorFlow")
        for node in library[name].node_def:
            yield name, tag, node
            pending.extend((called, tag) for called in called_functions(node))


def merge_opted_in(*found: dict) -> dict[str, list[str]]:
    """Several :attr:`OpInventory.opted_in` as one: op type -> the places of each, in order, once each.

    >>> merge_opted_in({"WriteFile": ["loading: _initialize"]}, {"WriteFile": ["model"], "PrintV2": ["model"]})
    {'PrintV2': ['model'], 'WriteFile': ['loading: _initialize', 'model']}
    """
    merged: dict[str, list[str]] = {}
    for opted_in in found:
        for op_type, places in opted_in.items():
            merged[op_type] = list(dict.fromkeys([*merged.get(op_type, []), *places]))
    return dict(sorted(merged.items()))


def called_functions(node_def) -> list[str]:
    """The functions a node calls: its ``func`` attributes and lists of them (a Case's branches)."""
    names = []
    for value in node_def.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        elif value.HasField("list"):
            names.extend(f.name for f in value.list.func)
    return [name for name in names if name]  # an unset function attribute names none


def _scope(name: str) -> str:
    """Where an op sits: its name without the op's own last part (``model/lambda/WriteFile`` -> ``model/lambda``)."""
    return name.rpartition("/")[0] or name
