import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest

from tests import rotation


def pytest_configure(config):
    config.addinivalue_line("markers", f"{rotation.MARK}(keep=1, per=()): a family of cases of which each run takes "
                            "`keep` per group of `per`'s values, by the run's seed (tests/rotation.py)")
    config.addinivalue_line("markers", f"{rotation.EXHAUSTIVE}: every test; `-m {rotation.EXHAUSTIVE}` runs them all "
                            "with every case of every rotated family")
    rotation.configure(config.option.markexpr)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(rotation.summary())


@pytest.hookimpl(hookwrapper=True)
def pytest_collection_modifyitems(config, items):
    for item in items:  # before -m selects: every test is one of -m exhaustive's
        item.add_marker(rotation.EXHAUSTIVE)
    yield
    # after -m selected: the rotation, among the cases it left
    if config.option.keyword or any("::" in arg for arg in config.args):
        return  # tests named by id or -k run whatever the rotation
    kept, dropped = rotation.select(items)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("run it again", rotation.again(item.nodeid)))


def start_ray(**kwargs):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(logging_level="ERROR", include_dashboard=False, **kwargs)
    return ray


ENGINE_PATHS = {
    "cpu_defaults": {},  # plain graph mode, forward-kernel convolution gradients
    "gpu_defaults": {"jit_compile": True, "conv_gradients": "framework"},  # what "auto" means on a GPU
}


@pytest.fixture(params=sorted(ENGINE_PATHS))
def engine_path(request):
    """Engine options of each default path: the GPU's (XLA + the framework's convolution gradients) is
    rehearsed on the CPU.  Check ``assert_path(gbp, engine_path)`` that it really ran."""
    return ENGINE_PATHS[request.param]


def assert_path(gbp, options) -> None:
    expected_jit = options.get("jit_compile", False)
    expected_conv = options.get("conv_gradients", "forward")
    assert (gbp.report["jit_compile"], gbp.report["conv_gradients"]) == (expected_jit, expected_conv)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster: 2 CPUs, no GPU.  Modules share it: it is started anew where a module before
    shut it down, started one of another shape, or left something holding its CPUs (Ray shuts it down when the
    tests end)."""
    import ray

    if not (ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
            and not ray.cluster_resources().get("GPU") and ray.available_resources().get("CPU") == 2):
        start_ray(num_cpus=2)
    yield ray


@pytest.fixture(scope="session")
def job_model(tmp_path_factory):
    """The question's CNN (untrained, fixed seed) at 32x32 with 10 classes, saved as .keras."""
    from tests.models import small_cnn

    path = tmp_path_factory.mktemp("model") / "question.keras"
    small_cnn(32, classes=10, seed=3).save(str(path))
    return str(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """A real S3-compatible server (moto) on a free loopback port, listening when this yields its port."""
    import socket
    import subprocess
    import sys
    import time

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()


@contextlib.contextmanager
def s3_environment(endpoint: str):
    """The S3 client settings every process started inside inherits (Ray's workers too): endpoint and test
    credentials, restored afterwards."""
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

