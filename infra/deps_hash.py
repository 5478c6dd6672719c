"""Print a short hash of the project's dependency list (pyproject.toml), used to key the
virtual environment so that it is rebuilt only when the dependencies change."""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path


def deps_hash(pyproject: Path) -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "dependencies": project["dependencies"],
        "optional": project.get("optional-dependencies", {}).get("dev", []),
    }
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]


if __name__ == "__main__":
    print(deps_hash(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
