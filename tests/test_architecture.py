"""The import rules that keep the architecture easy to see (README, Layout).

Each rule names a part of the package and the modules it must never import, directly:
the mask currency, FLOPs, metrics and the compaction of plain networks stay torch-only,
the layers know nothing of training or the command line, the pruning methods and the
Bayesian side know nothing of each other (they meet in sparsity/ and the harness), and
only the command line prints.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bayessparse"

# (files, forbidden import prefixes, why)
RULES = [
    (["sparsity/*.py", "metrics.py"], ["pyro", "bayessparse"], "torch-only"),
    # compaction/__init__.py is the Bayesian entry (compact: to_dense, then the rest).
    (["compaction/[!_]*.py"], ["pyro", "bayessparse"], "torch-only compaction"),
    (
        ["nn/*.py", "distributions/*.py"],
        ["bayessparse.training", "bayessparse.cli", "bayessparse.recipes", "bayessparse.sweep"],
        "layers and priors know nothing of training or the CLI",
    ),
    (["distributions/*.py"], ["bayessparse.nn"], "priors know nothing of layers"),
    (
        ["training/*.py"],
        ["bayessparse.cli", "bayessparse.recipes", "bayessparse.pruning", "bayessparse.bench"],
        "the loop names no recipe and no method",
    ),
    # The pruning methods and the Bayesian side meet only in sparsity/ and the harness.
    (
        ["pruning/*.py"],
        [
            "pyro",
            "bayessparse.nn",
            "bayessparse.distributions",
            "bayessparse.convert",
            "bayessparse.masks",
            "bayessparse.infer",
            "bayessparse.training",
            "bayessparse.recipes",
            "bayessparse.evaluation",
            "bayessparse.sweep",
            "bayessparse.bench",
            "bayessparse.cli",
        ],
        "methods are torch-only and know nothing of the Bayesian side or the harness",
    ),
    (
        ["compression/*.py"],
        [
            "pyro",
            "bayessparse.nn",
            "bayessparse.distributions",
            "bayessparse.masks",
            "bayessparse.convert",
            "bayessparse.infer",
            "bayessparse.training",
            "bayessparse.recipes",
            "bayessparse.bench",
            "bayessparse.cli",
        ],
        "compression beyond masks is torch-only, as the pruning methods",
    ),
    (
        ["nn/*.py", "distributions/*.py", "masks.py", "convert.py", "infer.py"],
        ["bayessparse.pruning", "bayessparse.bench"],
        "the Bayesian side knows no pruning method",
    ),
]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def files(patterns: list[str]) -> list[Path]:
    return sorted(p for pattern in patterns for p in PACKAGE.glob(pattern))


@pytest.mark.parametrize(("patterns", "forbidden", "why"), RULES)
def test_import_rules(patterns, forbidden, why):
    checked = files(patterns)
    assert checked, patterns
    for path in checked:
        bad = sorted(
            name
            for name in imports(path)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
            # the torch-only parts may import each other
            and not name.startswith(
                ("bayessparse.sparsity", "bayessparse.metrics", "bayessparse.compaction.")
            )
        )
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad} ({why})"


def test_only_the_cli_imports_the_cli_and_prints():
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        assert "bayessparse.cli" not in imports(path), path
        calls = [
            node
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "print"
        ]
        assert not calls, f"{path.relative_to(PACKAGE)} prints; the library warns instead"
