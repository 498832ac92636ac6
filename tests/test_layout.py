"""The package layout's import rules (tools/check_layout.py, run by `make lint`) hold, and the check fails
on the mistakes it exists for."""
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_layout", ROOT / "tools" / "check_layout.py")
check_layout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layout)


def test_the_package_has_no_cycles_and_no_upward_imports():
    assert check_layout.check(ROOT / "src" / "phitune") == []


@pytest.mark.parametrize("where, line, expected", [
    ("data/templates.py", "from phitune.data import records",
     "import cycle: phitune.data.records <-> phitune.data.templates"),
    ("data/sources.py", "from phitune.serving import schemas",
     "phitune.data.sources (data) imports phitune.serving.schemas"),
    ("training/loss.py", "from phitune.generation.engine import Engine",
     "(training) imports phitune.generation.engine"),
    ("generation/rows.py", "from phitune import compare", "imports phitune.compare (commands)"),
    ("compare.py", "from phitune import serve", "phitune.compare imports the command module phitune.serve"),
])
def test_the_check_names_a_cycle_an_upward_import_and_a_command_import(tmp_path, where, line, expected):
    pkg = tmp_path / "phitune"
    shutil.copytree(ROOT / "src" / "phitune", pkg, ignore=shutil.ignore_patterns("__pycache__", "static"))
    target = pkg / where
    target.write_text(target.read_text() + "\n\ndef _extra():\n" + "    " + line.strip() + "\n")
    problems = check_layout.check(pkg)
    assert any(expected in p for p in problems), problems
