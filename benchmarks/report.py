"""What every benchmark's JSON carries besides its numbers: the machine, the command, and the write itself."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def command() -> str:
    """The command line that produced the result, as it is run from the repository root."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
