"""The README's numbers come from commands; these tests rerun the cheap ones."""

import re
from pathlib import Path

from resvae.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_info_table_is_what_resvae_info_prints(capsys):
    m = re.search(r"`resvae info --arch study --depth 28,40,70,100`.*?```\n(.*?)```", README, re.S)
    assert m, "README lost its resvae info table"
    assert main(["info", "--arch", "study", "--depth", "28,40,70,100"]) == 0
    assert capsys.readouterr().out == m.group(1)


def test_readme_starts_with_the_two_commands():
    head = README.split("## What is in it")[0]
    assert "resvae train --preset cpu --data-dir ../shared/datasets/cifar10-jpeg" in head
    assert "python -m pytest -q" in head
    assert "python -m pytest -q" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
