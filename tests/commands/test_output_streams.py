"""A console that cannot be written ends a command in one line, never a traceback: a pipe its
reader closed with exit code 141 (128 + SIGPIPE), a full or failing stdout or stderr with 2, a
closed stdout or stderr with 2 before the command starts. Real processes and real pipes: the
console wrapper every command shares (nas/commands/cli.py) on a command that prints a lot, and
`nas report`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from nas.search.record import write_study
from nas.search.storage import close_storages, open_storage, sqlite_url

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PIPE_CLOSED = 141  # 128 + SIGPIPE, as a shell reports a process its pipe ended

# A command through the wrapper every nas command shares: it marks that it started, prints
# `lines` lines of 70 characters (more than a pipe holds), and a warning on stderr; or it
# refuses its input as a user mistake.
COMMAND = textwrap.dedent(
    """\
    import argparse, sys
    from pathlib import Path
    from nas.commands.cli import exit_code
    from nas.core.errors import NasError

    def run(args):
        if args.mistake:
            raise NasError("space.yaml", "is not a search space")
        Path("started").touch()
        for i in range(args.lines):
            print(f"line {i:07d} " + "x" * 57)
        print("warning: a warning", file=sys.stderr)
        return 0

    lines, mistake = int(sys.argv[1]), sys.argv[2] == "mistake"
    sys.exit(exit_code(run, argparse.Namespace(lines=lines, mistake=mistake)))
    """
)


def _shell(
    redirect: str, *args: str, cwd: Path, command: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`COMMAND args REDIRECT` (or `command`) in bash; its exit code, not a pipe's reader's."""
    argv = command or (sys.executable, "-c", COMMAND, *args)
    script = f'"$@" {redirect}; exit ${{PIPESTATUS[0]}}'
    return subprocess.run(["bash", "-c", script, "nas", *argv], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(
    "reader, lines",
    [("head -c 10 > /dev/null", 200_000), ("true", 20)],  # leaves on the way, or at once
)
def test_a_pipe_its_reader_closed_ends_in_exit_code_141_and_one_line(tmp_path, reader, lines):
    result = _shell(f"| {reader}", str(lines), "ok", cwd=tmp_path)
    assert result.returncode == PIPE_CLOSED, result.stderr
    assert _one_line(result.stderr).startswith("error: stdout: Broken pipe")


def test_a_pipe_closed_before_the_command_writes_ends_in_exit_code_141(tmp_path):
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-c", COMMAND, "5", "ok"], cwd=tmp_path,
                                env=ENV, stdout=write, stderr=subprocess.PIPE, text=True,
                                timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert result.returncode == PIPE_CLOSED
    assert _one_line(result.stderr).startswith("error: stdout: Broken pipe")
    assert (tmp_path / "started").exists()  # what it did before is kept


@pytest.mark.parametrize("lines", [5, 200_000])  # held until the end, or written on the way
def test_a_full_stdout_ends_in_exit_code_2_and_one_line(tmp_path, lines):
    result = _shell("> /dev/full", str(lines), "ok", cwd=tmp_path)
    assert result.returncode == 2
    assert _one_line(result.stderr) == (
        "error: stdout: No space left on device; the command stopped, keeping what it finished"
    )


@pytest.mark.parametrize("mistake", ["ok", "mistake"])
def test_a_full_stderr_ends_in_exit_code_2_and_says_nothing_more(tmp_path, mistake):
    result = _shell("2> /dev/full", "3", mistake, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ""
    assert result.stdout.count("\n") == (3 if mistake == "ok" else 0)


@pytest.mark.parametrize("stream, redirect", [("stdout", ">&-"), ("stderr", "2>&-")])
def test_a_closed_stdout_or_stderr_is_refused_before_the_command_starts(tmp_path, stream, redirect):
    result = _shell(redirect, "3", "ok", cwd=tmp_path)
    assert result.returncode == 2
    assert not (tmp_path / "started").exists()
    if stream == "stdout":
        assert _one_line(result.stderr).startswith("error: stdout: is closed")
    else:
        assert result.stderr == ""
        assert result.stdout == ""


# --- a real command -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory) -> Path:
    """results/unet: a study nas's way, with no trial yet (report reads it without training)."""
    folder = tmp_path_factory.mktemp("streams") / "results" / "unet"
    storage = open_storage(sqlite_url(folder / "study.db"))
    study = optuna.create_study(
        storage=storage, study_name="unet", directions=["maximize", "minimize"]
    )
    write_study(study, objectives=["iou", "params"])
    close_storages()
    return folder


@pytest.mark.parametrize(
    "redirect, code, line",
    [
        ("> /dev/full", 2, "error: stdout: No space left on device"),
        ("| true", PIPE_CLOSED, "error: stdout: Broken pipe"),
        (">&-", 2, "error: stdout: is closed"),
    ],
    ids=["full", "pipe-closed", "closed"],
)
def test_nas_report_on_a_console_it_cannot_write_ends_in_one_line(
    study_folder, redirect, code, line
):
    (study_folder / "report.html").unlink(missing_ok=True)
    command = (sys.executable, "-m", "nas.report", "results/unet")
    # `| true`: the reader is gone long before report prints, which takes seconds to import
    result = _shell(redirect, cwd=study_folder.parent.parent, command=command)
    assert result.returncode == code, result.stderr
    assert _one_line(result.stderr).startswith(line)
    assert (study_folder / "report.html").exists() == (redirect != ">&-")  # done, or not begun
