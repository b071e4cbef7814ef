"""docs/architecture.md's "Where things live" names real modules and names, and every module."""

import importlib
import re
from pathlib import Path

import resvae

ROOT = Path(__file__).resolve().parents[1]


def _table():
    rows = re.findall(r"^\| [^|]+ \| `([\w.]+)\.py` \| (.*) \|$",
                      (ROOT / "docs" / "architecture.md").read_text(), re.M)
    assert len(rows) > 20, "docs/architecture.md lost its table"
    return {module: re.findall(r"`(\w+)`", names) for module, names in rows}


def test_every_listed_name_is_where_the_page_says():
    for module, names in _table().items():
        if module == "__main__":  # importing it runs the command line
            continue
        mod = resvae if module == "__init__" else importlib.import_module(f"resvae.{module}")
        missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"docs/architecture.md: {module}.py has no {missing}"


def test_every_module_of_the_package_is_listed():
    modules = {p.stem for p in Path(resvae.__file__).parent.glob("*.py")}
    assert modules == set(_table()), "docs/architecture.md and src/resvae/ disagree"
