"""CI runs what the README tells a developer to run, and a test that needs Chromium or
PostgreSQL skips on a developer's machine without them but fails in CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import require, require_module

ROOT = Path(__file__).parents[1]


def _readme_test_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Test\n\n```bash\n(.*?)```", readme, re.S | re.M)
    assert block, "README has no Test section with a bash block"
    return block.group(1).splitlines()


def test_ci_runs_the_readme_test_commands_with_every_test_required():
    script = (ROOT / ".ci" / "run").read_text().split("# README: test\n", 1)[1]
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert commands == [
        *_readme_test_commands()[:-1],
        "export NAS_REQUIRE_ALL_TESTS=1",
        _readme_test_commands()[-1],
    ]
    assert _readme_test_commands()[-1] == "pytest -rs"


def test_require_skips_saying_why_unless_every_test_is_required(monkeypatch):
    monkeypatch.delenv("NAS_REQUIRE_ALL_TESTS", raising=False)
    require(True, "never shown")
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
        require(False, "Chromium is not installed")
    with pytest.raises(pytest.skip.Exception, match="no_such_module"):
        require_module("no_such_module", "it is not installed")

    monkeypatch.setenv("NAS_REQUIRE_ALL_TESTS", "1")
    require(True, "never shown")
    with pytest.raises(pytest.fail.Exception, match="Chromium is not installed"):
        require(False, "Chromium is not installed")
    with pytest.raises(pytest.fail.Exception, match="no_such_module"):
        require_module("no_such_module", "it is not installed")
    assert require_module("json", "never shown").loads("[1]") == [1]
