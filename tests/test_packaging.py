"""One import root, every subpackage in the wheel, no shadowing of third-party `evaluate`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import coarse2fine

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("pipelines", "preprocess", "train", "evaluate")


def test_repo_root_not_on_sys_path():
    assert str(REPO) not in [str(Path(p).resolve()) for p in sys.path if p]


def test_subpackages_import_under_one_root():
    import coarse2fine.evaluate as ours

    assert Path(ours.__file__).resolve().parent == REPO / "evaluate"
    # a top-level `evaluate` is Hugging Face's (if installed), never ours
    spec = importlib.util.find_spec("evaluate")
    assert spec is None or Path(spec.origin).resolve().parent != REPO / "evaluate"
    assert coarse2fine.__version__


def test_wheel_contains_every_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
    )
    (wheel,) = tmp_path.glob("coarse2fine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"coarse2fine/__init__.py"}
    for root in ROOTS:
        for init in (REPO / root).rglob("__init__.py"):
            expected.add("coarse2fine/" + str(init.relative_to(REPO)))
    assert expected <= names, sorted(expected - names)
    for py in (REPO / "preprocess").rglob("*.py"):
        assert "coarse2fine/" + str(py.relative_to(REPO)) in names
