"""Reading a YAML file: safe_load only, and every way it can fail as one NasError naming it.

The search space, an exported model's architecture.yaml and the values of `--set` are all
read here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nas.errors import NasError


def read_yaml(path: Path) -> Any:
    """The plain data (dicts, lists, scalars) in `path`; tags that build objects are refused."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NasError(path, "file not found") from None
    except UnicodeDecodeError:
        raise NasError(path, "not valid YAML: not UTF-8 text") from None
    except OSError as err:
        raise NasError(path, f"cannot be read ({err.strerror})") from None
    return parse_yaml(text, path)


def parse_yaml(text: str, source: str | Path) -> Any:
    """The plain data in `text`; a NasError naming `source` where it is not valid YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise NasError(source, f"not valid YAML: {' '.join(str(err).split())}") from None
