"""Shared fixtures: tiny search spaces and a tiny generated dataset on real NIfTI files."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

from nas.data import Case, DataConfig, SyntheticSpec, ensure_synthetic_dataset, load_dataset

# The fuzzers' settings (tests/search/test_fuzz.py, tests/core/test_fuzz_files.py):
# NAS_FUZZ_EXAMPLES examples per property, the same 15 in every CI run unless more are asked for.
FUZZ_EXAMPLES = int(os.environ.get("NAS_FUZZ_EXAMPLES", "15"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=FUZZ_EXAMPLES <= 15,  # CI: the same examples every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

TINY_SPEC = SyntheticSpec(n_cases=6, shape=(32, 32, 16), spacing_mm=(1.5, 1.5, 3.0), seed=3)


def tiny_space_yaml(
    data_path: Path,
    name: str = "tiny",
    n_trials: int = 3,
    extra: str = "",
    pruner: str = "{type: none}",
) -> str:
    """A search space that trains in about a second per trial; `extra` extends its study
    section. No pruning unless asked: tests count completed trials."""
    return (
        textwrap.dedent(
            f"""\
        data:
          path: {data_path}
          synthetic: {{n_cases: 6, shape: [32, 32, 16], spacing_mm: [1.5, 1.5, 3.0], seed: 3}}
          n_folds: 3
        search:
          spatial_dims: {{type: categorical, choices: [2, 3]}}
          depth: {{type: int, low: 1, high: 3}}
          base_channels: 4
          skips: {{type: categorical, choices: [true, false], per_stage: true}}
          anisotropic_stages: {{type: int, low: 0, high: 1, when: {{spatial_dims: 3}}}}
        train:
          epochs: 2
          batches_per_epoch: 3
          batch_size_2d: 4
          patch_size_2d: [32, 32]
          batch_size_3d: 1
          patch_size_3d: [32, 32, 16]
          learning_rate: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
        study:
          name: {name}
          sampler: random
          n_trials: {n_trials}
          seed: 0
          pruner: {pruner}
        """
        )
        + extra
    )


@pytest.fixture(scope="session", autouse=True)
def preprocessing_cache(tmp_path_factory):
    """Keep every test's preprocessed arrays (and the CLI's, via the environment) in tmp."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("cache")
        patch.setenv("NAS_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def default_float_state():
    """Each test starts with PyTorch's default float state: picking the CPU or training
    flushes denormal floats to zero in the test's process (nas.network.device.flush_denormals),
    and a later test in that process (hypothesis draws subnormal floats) must not depend on which
    tests ran before it. Torch is not imported for tests that do not use it."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_cases(tiny_dataset) -> tuple[Case, ...]:
    """The tiny dataset's cases, preprocessed through the cache."""
    return load_dataset(DataConfig(path=tiny_dataset)).cases


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m module args` as a user would, in `cwd`: through the module's entry point
    (argument parsing, exit codes, what it prints), in this process. Starting an interpreter
    that imports torch costs more than most of these runs on 2 cores; the tests that need a
    process of their own (signals, kills, workers, a fresh interpreter) start one with Popen."""
    main = importlib.import_module(module).main
    stdout, stderr = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(args))
            except SystemExit as exit:  # argparse's usage errors and --help
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(
        [sys.executable, "-m", module, *args], code, stdout.getvalue(), stderr.getvalue()
    )


def user_error(result: subprocess.CompletedProcess) -> str:
    """The one line a user mistake prints, after checking it is one: exit code 2, no
    traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def require(condition: bool, reason: str) -> None:
    """Skip the calling test unless `condition` holds, saying why. With NAS_REQUIRE_ALL_TESTS=1
    (as .ci/run sets) fail instead: in CI a missing browser or server must not pass quietly."""
    if condition:
        return
    if os.environ.get("NAS_REQUIRE_ALL_TESTS") == "1":
        pytest.fail(f"{reason}, and NAS_REQUIRE_ALL_TESTS=1 requires it", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str) -> ModuleType:
    """The module `name`, imported; if it cannot be, skip or fail as `require` does."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        require(False, f"{reason} ({error})")
        raise  # unreachable: require skipped or failed


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen):
    """Poll `condition` until it returns something true (returned), failing the test if the
    process ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}: {process.communicate()[0]}")
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


# The password of the PostgreSQL server the tests start: a test that runs a command with
# the storage URL greps everything the command printed or wrote for it.
POSTGRES_PASSWORD = "pg-Secret-4711"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server from Debian's package, on a free loopback port, that
    asks for a password: yields a function that creates a new database and returns its URL."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    require(
        bool(initdb),
        "PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)",
    )
    require_module("psycopg", "psycopg is not installed (.[postgres])")
    bin_dir = initdb[-1].parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="nas-pg-"))  # outside pytest's root-only tmp
    (data / "pw").write_text(POSTGRES_PASSWORD + "\n")
    if as_postgres:
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(data / "pw", "postgres", "postgres")
    port = _free_port()
    env = os.environ | {"PGPASSWORD": POSTGRES_PASSWORD}

    def run(*command: str) -> None:
        subprocess.run([*as_postgres, *command], check=True, capture_output=True, timeout=120,
                       env=env)  # fmt: skip

    run(str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "nas", "--auth=scram-sha-256",
        f"--pwfile={data / 'pw'}")  # fmt: skip
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    run(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-l", str(data / "log"),
        "-w", "start")  # fmt: skip
    made = iter(range(1_000_000))

    def new_database() -> str:
        name = f"nas{next(made)}"
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "nas", name)
        return f"postgresql+psycopg://nas:{POSTGRES_PASSWORD}@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL, password included, of a new database on the tests' PostgreSQL server."""
    return postgres_server()
