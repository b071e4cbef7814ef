"""The package's metadata has one version and ships what it promises (py.typed, presets)."""

import re
from pathlib import Path

import resvae

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_takes_its_version_from_the_package():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "resvae.__version__"}


def test_citation_and_changelog_name_the_package_version():
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(r'^version:\s*"?([^"\s]+)"?\s*$', cff, re.M).group(1) == resvae.__version__
    releases = re.findall(r"^## \[(\d[^\]]*)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == resvae.__version__


def test_py_typed_and_presets_are_package_data():
    pkg = Path(resvae.__file__).parent
    assert (pkg / "py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"py.typed", "configs/*.toml"} <= set(data["package-data"]["resvae"])
