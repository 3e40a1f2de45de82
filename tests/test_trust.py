"""A model is a program: models written as an attacker would write them are refused before any image.

Each SavedModel's serving function computes a small CNN's logits and does one more thing to the outside world
(writes, reads or lists files, prints to a file, saves a tensor), aimed at a canary path, or something
TensorFlow's loader runs does (a resource's initialiser or destroyer; a TF1 file's init, local-variable or
restore op).  Through the Python API, the command-line job and the audit of a received output, each is refused
in one line naming the opt-in, and the canary is untouched.  The opted-in runs show the same models really do
what they say.  Opt-ins recorded in a job's output are never acted on by whoever audits it.
"""

import gc
import html
import json
import os
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

import worker.job.progress  # noqa: F401 - imported here: its progress lines bind sys.stderr when first imported
from tests import jobdata
from worker import GuidedBackprop, SideEffectError, UnsafeModelError
from worker.engine.allowlist import check_graph, check_saved_model

SIZE = 16
SIDE_EFFECTS = ("write", "read", "list", "print", "save", "init")
#: the side effects a resource's functions have, run by TensorFlow's loader: kind -> which function writes
LOAD_TIME = {"init": "_initialize", "destroy": "_destroy_resource"}


def _cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])


def _side_effect(kind: str, canary: str, listed: str):
    """``(x, logits) -> logits`` doing ``kind`` to the outside world on the way."""
    if kind == "write":
        return lambda x, logits: tf.tuple([logits], control_inputs=[
            tf.io.write_file(canary, tf.strings.as_string(tf.reduce_sum(x)))])[0]
    if kind == "read":  # a secret read into the logits
        return lambda x, logits: logits + tf.strings.to_number(tf.io.read_file(canary))
    if kind == "list":
        return lambda x, logits: logits + tf.cast(tf.size(tf.io.matching_files(listed)), tf.float32)
    if kind == "print":
        return lambda x, logits: tf.tuple([logits], control_inputs=[
            tf.print("input sum", tf.reduce_sum(x), output_stream="file://" + canary)])[0]
    if kind == "save":
        return lambda x, logits: tf.tuple([logits], control_inputs=[
            tf.raw_ops.Save(filename=canary, tensor_names=["x"], data=[x])])[0]
    return lambda x, logits: logits


class _Resource(tf.saved_model.experimental.TrackableResource):
    """A resource whose ``writes`` function writes ``canary``: TensorFlow's loader runs ``_initialize`` when the
    SavedModel is loaded, and binds ``_destroy_resource`` to the restored resource, which runs it when collected."""

    def __init__(self, canary, writes):
        self.canary, self.writes = canary, writes
        super().__init__()

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

    def _initialize(self):
        if self.writes == "_initialize":
            tf.io.write_file(self.canary, "loaded")
        return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)

    def _destroy_resource(self):
        if self.writes == "_destroy_resource":
            tf.io.write_file(self.canary, "destroyed")


def _export(path: str, cnn, extra, canary: str | None = None, writes: str = "_initialize") -> str:
    module = tf.Module()
    module.model = cnn
    if canary is not None:
        module.resource = _Resource(canary, writes)

    @tf.function(input_signature=[tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32)])
    def serve(x):
        return extra(x, module.model(x))

    tf.saved_model.save(module, path, signatures={"serving_default": serve})
    return path


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    """``{kind: (SavedModel dir, canary path)}`` for each side effect and ``pure`` (the control); the read
    canary holds a secret number, the list canary's directory holds one file."""
    root = tmp_path_factory.mktemp("attacker")
    cnn = _cnn()
    models = {}
    for kind in (*SIDE_EFFECTS, *LOAD_TIME, "pure"):
        canary = str(root / f"canary_{kind}")
        listed = root / "listed"
        listed.mkdir(exist_ok=True)
        (listed / "secret.txt").write_text("x")
        models[kind] = (_export(str(root / kind), cnn, _side_effect(kind, canary, str(listed / "*")),
                                canary if kind in LOAD_TIME else None, LOAD_TIME.get(kind, "")), canary)
    gc.collect()  # the destroy resource, and the copy saving made of it, ran their destroyer here, as built
    (root / "canary_destroy").unlink()
    (root / "canary_read").write_text("1000")
    return models


def _untouched(kind: str, canary: str) -> None:
    """Nothing written (the canary absent), or the read canary as it was and never opened for writing."""
    if kind == "read":
        assert open(canary).read() == "1000"
    else:
        assert not os.path.exists(canary)


def _one_line_refusal(text: str, *op_types: str) -> None:
    assert "\n" not in text.strip(), text
    assert "--allow-side-effects" in text and all(t in text for t in op_types), text


OP_TYPE = {"write": "WriteFile", "read": "ReadFile", "list": "MatchingFiles", "print": "PrintV2", "save": "Save",
           # run by TensorFlow's loader: the resource's initialiser when loaded, its destroyer when collected
           "init": "WriteFile at function __inference__initializer",
           "destroy": "WriteFile at function __inference__destroyer"}


@pytest.mark.parametrize("kind", (*SIDE_EFFECTS, "destroy"))
def test_python_api_refuses_each_side_effect_before_any_image(attacker, kind):
    path, canary = attacker[kind]
    with pytest.raises(SideEffectError) as refused:
        GuidedBackprop(path, batch_size=2)
    _one_line_refusal(str(refused.value), OP_TYPE[kind])
    # where it sits: the serving function's call, or the resource's function
    assert ("StatefulPartitionedCall" if kind not in LOAD_TIME else "(when loaded)") in str(refused.value)
    _untouched(kind, canary)


def _tf1_saved_model(path: str, main_op_writes: str | None = None, local_writes: str | None = None) -> str:
    """A TF1 SavedModel; ``main_op_writes``: its main op writes that file; ``local_writes``: the initialiser of a
    local variable does (with no init op, the loader runs the local variables' initialisers)."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        x = tf.compat.v1.placeholder(tf.float32, (None, SIZE, SIZE, 3), name="x")
        kernel = tf.compat.v1.get_variable("kernel", (SIZE * SIZE * 3, 3))
        logits = tf.matmul(tf.nn.relu(tf.reshape(x, (-1, SIZE * SIZE * 3))), kernel)
        if local_writes:
            with tf.control_dependencies([tf.io.write_file(local_writes, "initialised")]):
                start = tf.identity(tf.zeros(()))
            tf.compat.v1.Variable(start, collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES], name="steps")
        session.run(tf.compat.v1.global_variables_initializer())
        builder = tf.compat.v1.saved_model.Builder(path)
        signature = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"logits": logits})
        main_op = tf.io.write_file(main_op_writes, "loaded") if main_op_writes else None
        builder.add_meta_graph_and_variables(session, ["serve"], {"serving_default": signature}, main_op=main_op)
        builder.save()
    return path


def _tampered(path: str, canary: str, where: str) -> str:
    """The TF1 SavedModel at ``path`` with an op writing ``canary`` added for the loader to run: ``restore``: before
    the saver's restore op; ``init``: as the init op (the signature-def entry ``__saved_model_init_op``);
    ``meta_graph``: as the init op of a second meta graph (tags ``other``), a copy of the first; ``missing``: the
    init op calls a function the file does not hold (instead of writing)."""
    from tensorflow.core.framework import attr_value_pb2, node_def_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    with tf.Graph().as_default() as graph, tf.name_scope("tamper"):
        tf.io.write_file(tf.constant(canary), tf.constant("tampered"))
    added, op = list(graph.as_graph_def().node), "tamper/WriteFile"
    if where == "missing":
        op = "tamper/call"
        added = [node_def_pb2.NodeDef(name=op, op="PartitionedCall", attr={
            "f": attr_value_pb2.AttrValue(func=attr_value_pb2.NameAttrList(name="nowhere"))})]
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(open(os.path.join(path, "saved_model.pb"), "rb").read())
    meta = saved.meta_graphs[0]
    if where == "meta_graph":
        meta = saved.meta_graphs.add()
        meta.CopyFrom(saved.meta_graphs[0])
        meta.meta_info_def.tags[:] = ["other"]
    meta.graph_def.node.extend(added)
    if where == "restore":
        restore = next(n for n in meta.graph_def.node if n.name == meta.saver_def.restore_op_name)
        restore.input.append("^" + op)
    else:
        meta.signature_def["__saved_model_init_op"].outputs["__saved_model_init_op"].name = op
    open(os.path.join(path, "saved_model.pb"), "wb").write(saved.SerializeToString())
    return path


def test_tf1_load_time_side_effects_are_refused_before_loading(tmp_path):
    """What TensorFlow's loader runs from a TF1 SavedModel -- its main op, the init op of its signature defs, a
    local variable's initialiser, the saver's restore op -- is checked first.  The plain file builds; opted in,
    loading really runs each side effect."""
    plain = GuidedBackprop(_tf1_saved_model(str(tmp_path / "plain")), batch_size=1)
    assert plain.coverage.opted_in == {}
    canary = tmp_path / "canary"
    for path in (_tf1_saved_model(str(tmp_path / "main_op"), str(canary)),
                 _tampered(_tf1_saved_model(str(tmp_path / "init")), str(canary), "init"),
                 _tf1_saved_model(str(tmp_path / "local"), local_writes=str(canary)),
                 _tampered(_tf1_saved_model(str(tmp_path / "restore")), str(canary), "restore")):
        with pytest.raises(SideEffectError, match="when loaded.*WriteFile at loading") as refused:
            GuidedBackprop(path, batch_size=1)
        _one_line_refusal(str(refused.value), "WriteFile")
        assert not canary.exists()
        GuidedBackprop(path, batch_size=1, allow_side_effects=True)
        assert canary.exists(), path  # the attack is real: loading ran it
        canary.unlink()


def test_every_meta_graph_of_a_tf1_file_is_checked(tmp_path):
    """Two meta graphs make TensorFlow's loader take the TF1 path (it then needs ``tags=`` to pick one): the
    init op of the second is refused as the first's would be; the loader given its tags really runs it."""
    canary = tmp_path / "canary"
    path = _tampered(_tf1_saved_model(str(tmp_path / "two")), str(canary), "meta_graph")
    with pytest.raises(SideEffectError, match="when loaded.*WriteFile at loading: tamper") as refused:
        GuidedBackprop(path, batch_size=1)
    _one_line_refusal(str(refused.value), "WriteFile")
    assert not canary.exists()
    tf.saved_model.load(path, tags=["other"])
    assert canary.exists()


def test_a_function_missing_from_the_library_is_refused(tmp_path):
    """A function that is called but not in the file cannot be inspected: refused in one line naming it, with
    or without the opt-in."""
    path = _tampered(_tf1_saved_model(str(tmp_path / "missing")), str(tmp_path / "canary"), "missing")
    for opted_in in (False, True):
        with pytest.raises(SideEffectError, match="calls function nowhere, which is not in its function library"):
            check_saved_model(path, allow_side_effects=opted_in)


def test_keras_layer_with_a_side_effect_is_refused_naming_the_layer(tmp_path):
    canary = tmp_path / "canary"

    class Tap(keras.layers.Layer):
        def call(self, x):
            written = tf.io.write_file(str(canary), tf.strings.as_string(tf.reduce_sum(x)))
            return tf.tuple([x], control_inputs=[written])[0]

    image = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(image, _cnn()(Tap(name="tap")(image)))
    with pytest.raises(SideEffectError, match="WriteFile at [^ ]*tap") as refused:
        GuidedBackprop(model, batch_size=1)
    _one_line_refusal(str(refused.value), "WriteFile")
    assert not canary.exists()


def test_opted_in_side_effects_happen_and_are_reported(attacker):
    """The control of the tests above: with the opt-in, the models do what they were written to do, and the
    coverage report (and with it the run record) names what ran outside the allowlist."""
    images = np.full((2, SIZE, SIZE, 3), 7, np.uint8)
    pure = GuidedBackprop(attacker["pure"][0], batch_size=2)
    expected = pure.predict(images)
    assert pure.report["coverage"]["opted_in"] == {} and pure.report["coverage"]["ops"]["Conv2D"] >= 1
    path, canary = attacker["write"]
    writer = GuidedBackprop(path, batch_size=2, allow_side_effects=True)
    assert list(writer.report["coverage"]["opted_in"]) == ["AsString", "WriteFile"]
    writer.explain(images)
    assert float(open(canary).read()) == 2 * SIZE * SIZE * 3 * 7
    reader = GuidedBackprop(attacker["read"][0], batch_size=2, allow_side_effects=True)
    np.testing.assert_allclose(reader.predict(images), expected + 1000, rtol=1e-5)
    lister = GuidedBackprop(attacker["list"][0], batch_size=2, allow_side_effects=True)
    np.testing.assert_allclose(lister.predict(images), expected + 1, rtol=1e-5)
    os.remove(canary)
    path, canary = attacker["init"]
    assert "WriteFile" in GuidedBackprop(path, batch_size=2, allow_side_effects=True).report["coverage"]["opted_in"]
    assert os.path.exists(canary)  # loading ran the resource's initialiser
    os.remove(canary)
    path, canary = attacker["destroy"]
    assert "WriteFile" in GuidedBackprop(path, batch_size=2, allow_side_effects=True).report["coverage"]["opted_in"]
    gc.collect()
    assert os.path.exists(canary)  # the restored resource, once collected, ran its destroyer
    os.remove(canary)


def test_loops_are_refused_in_the_model_and_allowed_in_the_engine():
    """A model's own ``while`` (a graph that may never return) is refused; SmoothGrad's per-image loop, which
    the engine adds outside the model, is not."""
    cnn = _cnn()

    class Spin(keras.layers.Layer):
        def call(self, x):
            return tf.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y * 1.0), [tf.constant(0), x])[1]

    image = keras.Input((SIZE, SIZE, 3))
    looping = keras.Model(image, cnn(Spin(name="spin")(image)))
    with pytest.raises(SideEffectError, match="While at .*spin") as refused:
        GuidedBackprop(looping, batch_size=1)
    _one_line_refusal(str(refused.value), "While")
    assert GuidedBackprop(looping, batch_size=1, allow_side_effects=True).report["coverage"]["opted_in"]
    smooth = GuidedBackprop(cnn, batch_size=1, smooth=2)
    assert smooth.coverage.ops.get("While", 0) + smooth.coverage.ops.get("StatelessWhile", 0) >= 1


def test_functions_and_branches_are_walked():
    """An op in a function called from a conditional's branch, two calls deep, is found and named there."""
    @tf.function(autograph=False)
    def deep(x):
        return tf.tuple([x], control_inputs=[tf.io.write_file("/nonexistent/never", "x")])[0]

    def f(x):
        return tf.cond(tf.reduce_sum(x) > 0, lambda: deep(x) * 2.0, lambda: x)

    graph = tf.function(f, autograph=False).get_concrete_function(tf.TensorSpec((2,))).graph
    with pytest.raises(SideEffectError, match=r"WriteFile at function .*deep"):
        check_graph(graph)
    assert check_graph(graph, allow_side_effects=True).opted_in["WriteFile"]


# -- the command-line job and the audit of a received output ------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    images, labels = jobdata.digits(16, size=SIZE)
    path = tmp_path_factory.mktemp("data") / "d.parquet"
    jobdata.write_hf(path, images, labels % 3, row_group=8)
    return str(path)


def _explain(model, dataset, output, *flags):
    from worker.cli import main

    return main(["explain", "--model", model, "--input", dataset, "--output", output, "--preprocessing",
                 "scale01", "--batch-size", "8", "--label-column", "label", *flags])


@pytest.mark.parametrize("kind", SIDE_EFFECTS)
def test_cli_job_refuses_each_side_effect(ray_local, attacker, dataset, kind, tmp_path, capsys):
    path, canary = attacker[kind]
    assert _explain(path, dataset, str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    _one_line_refusal(err, OP_TYPE[kind])
    _untouched(kind, canary)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


@pytest.fixture(scope="module")
def received(ray_local, attacker, dataset, tmp_path_factory):
    """A job's output (of the pure model) as someone would receive it."""
    out = str(tmp_path_factory.mktemp("received") / "out")
    assert _explain(attacker["pure"][0], dataset, out) == 0
    return out


@pytest.mark.slow
def test_audit_of_a_received_output_does_not_run_a_side_effect_model(received, attacker, tmp_path):
    """The model the audit's controls would rebuild writes a file (every side effect is refused by the same
    check, above): the model steps are skipped in one line naming the flag, the steps that need no model
    still write the report, and the canary is untouched."""
    from worker.audit import run_audit

    kind = "write"
    path, canary = attacker[kind]
    lines = []
    result = run_audit(received, str(tmp_path / "report"), controls=2, interventions=2, compare_methods=1,
                       model=path, echo=lines.append)
    skipped = [line for line in lines if "skipped" in line]
    assert len(skipped) == 1 and skipped[0] == "audit: " + result.skipped
    _one_line_refusal(result.skipped, OP_TYPE[kind])
    assert result.controls is None and result.method_comparison is None and result.interventions is None
    assert (tmp_path / "report" / "audit.json").exists()
    assert html.escape(result.skipped, quote=False) in (tmp_path / "report" / "report.html").read_text()
    _untouched(kind, canary)


def _lambda_model(path: str, canary: str) -> str:
    """A .keras model whose Lambda appends to ``canary`` each time its Python code runs."""
    keras.utils.set_random_seed(0)
    image = keras.Input((SIZE, SIZE, 3))
    marked = keras.layers.Lambda(lambda t, c=canary: (open(c, "a").write("ran\n"), t)[1])(image)
    h = keras.layers.Conv2D(4, 3, activation="relu")(marked)
    keras.Model(image, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))).save(path)
    os.remove(canary)  # building it ran the code once, here
    return path


def _forged(output: str, into, **record) -> str:
    """A copy of a job's ``output`` whose run record says ``record`` (an output is data: anyone can write it)."""
    from worker.data.schema import METADATA_KEY, read_metadata

    for part in sorted(Path(output).rglob("*.parquet")):
        table = pq.read_table(str(part))
        metadata = read_metadata(table.schema)
        metadata["config"].update(record)
        target = into / part.relative_to(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata,
                                                      METADATA_KEY: json.dumps(metadata).encode()}), str(target))
    return str(into)


@pytest.mark.slow
def test_audit_never_acts_on_the_unsafe_opt_in_of_the_run_record(received, tmp_path):
    """An output whose record says its owner opted in to a Lambda's code (and to side effects): an auditor who
    did not is never made to run it.  The record's choice is reported, the model steps are skipped naming the
    flag, and the steps that need no model still write the report."""
    from worker.audit import run_audit

    canary = tmp_path / "canary"
    model = _lambda_model(str(tmp_path / "lambda.keras"), str(canary))
    output = _forged(received, tmp_path / "forged", model=model, allow_unsafe_deserialization=True,
                     allow_side_effects=True)
    lines = []
    result = run_audit(output, str(tmp_path / "report"), controls=2, interventions=2, compare_methods=1,
                       echo=lines.append)
    assert not canary.exists()
    assert any("--allow-unsafe-deserialization, --allow-side-effects" in line and "only the opt-ins on its own"
               in line for line in lines)
    assert "--allow-unsafe-deserialization" in result.skipped and "\n" not in result.skipped
    assert result.controls is None and (tmp_path / "report" / "report.html").exists()


def test_unsafe_opt_in_is_not_taken_from_a_run_record(tmp_path):
    """A record's opt-ins are never acted on: ``JobConfig.from_dict`` leaves them off, and the engine built from it
    refuses the model, unless its caller passes their own."""
    from worker.job.config import JobConfig, build_engine

    canary = tmp_path / "canary"
    model = _lambda_model(str(tmp_path / "lambda.keras"), str(canary))
    record = JobConfig(model=model, input="i", output="o", allow_unsafe_deserialization=True,
                       allow_side_effects=True).to_dict()
    rebuilt = JobConfig.from_dict(record)
    assert not rebuilt.allow_unsafe_deserialization and not rebuilt.allow_side_effects
    assert rebuilt.model == model  # the rest of the record is kept
    with pytest.raises(UnsafeModelError, match="--allow-unsafe-deserialization"):
        build_engine(rebuilt, model, batch_size=1)
    assert not canary.exists()
    build_engine(JobConfig.from_dict(record, allow_unsafe_deserialization=True), model, batch_size=1)
    assert canary.exists()  # the caller's own flag loads it: the code runs


@pytest.mark.slow
def test_run_record_carries_the_ops_seen(received):
    from worker.data.schema import read_metadata

    files = sorted(Path(received).rglob("*.parquet"))
    metadata = read_metadata(pq.read_schema(str(files[0])))
    coverage = metadata["coverage"]
    assert coverage["ops"]["Conv2D"] >= 1 and coverage["opted_in"] == {}
    assert metadata["config"]["allow_side_effects"] is False


@pytest.mark.slow
def test_families_without_relu_build_under_the_allowlist():
    """keras.applications families the reference tests do not build (they build every ReLU family): hard-swish
    and GELU, with every activation's rule and SmoothGrad, need nothing outside the allowlist (swish and GELU
    are also in the fuzzer's models)."""
    for name in ("MobileNetV3Small", "ConvNeXtTiny"):
        model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=3,
                                                  classifier_activation=None)
        engine = GuidedBackprop(model, batch_size=1, activations="all", smooth=1)
        assert engine.coverage.opted_in == {} and engine.coverage.ops, name
        keras.backend.clear_session()
