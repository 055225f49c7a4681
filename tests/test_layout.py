"""The packages' import boundaries: the service, the worker and the helper share only
spice_stream_common, which imports none of them (issue 16's layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "spice_streamd": ROOT / "service" / "spice_streamd",
    "spice_stream_worker": ROOT / "service" / "spice_stream_worker",
    "spice_stream_common": ROOT / "service" / "spice_stream_common",
    "spice_stream_helper": ROOT / "helper" / "spice_stream_helper",
}
# What each package may import of the others.
ALLOWED = {
    "spice_streamd": {"spice_stream_common"},
    "spice_stream_worker": {"spice_stream_common"},
    "spice_stream_helper": {"spice_stream_common"},
    "spice_stream_common": set(),
}


def project_imports(path: Path) -> set[str]:
    """The project's top-level packages that a module imports (absolute imports only: a
    relative import stays inside its own package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_stay_within_bounds(package: str) -> None:
    wrong = {}
    for module in sorted(PACKAGES[package].rglob("*.py")):
        bad = project_imports(module) - ALLOWED[package] - {package}
        if bad:
            wrong[str(module.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"{package} imports what it must not: {wrong}"


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The check above can fail: a module of the worker importing the service is caught.
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom spice_streamd.errors import InvalidArgument\n"
                      "from . import sibling\n")
    assert project_imports(module) == {"spice_streamd"}
