"""Mutation testing of the core math modules with cosmic-ray (`make mutation`; slow, not in CI).

For each module, cosmic-ray mutates it in a scratch clone of HEAD (``.c2f/mutation/src``) and runs
the module's fast tests once per mutant; a mutant is killed when a test fails. The tests import the
scratch clone: the editable install's finder is remapped to it for the test process (the same
trick as running tests in a git worktree). Prints killed / completed per module as a Markdown table
(record it in benchmarks/RESULTS.md with the machine); sessions resume where they stopped, as
long as the module and its tests are unchanged (a change to either starts a new session).

    python benchmarks/mutation.py [--module train/kernels/haar.py ...] [--minutes 30]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = {  # module -> the fast tests that pin its math
    "train/kernels/haar.py": "tests/test_dwt.py",
    "train/models/quantizer.py": "tests/test_sit_models.py tests/test_cq.py -m 'not slow'",
    "train/kernels/nearest_code.py": "tests/test_kernels.py",
    "preprocess/mumford_shah.py": "tests/test_mumford_shah.py -m 'not slow'",
    "evaluate/metrics.py": "tests/test_evaluate_metrics.py",
    "train/kernels/attention.py": "tests/test_kernels.py tests/test_methods.py -k 'attention or block_causal'",
    "train/sampling.py": "tests/test_arsit.py -m 'not slow'",
}


def finder_module() -> str:
    """The editable install's finder (``__editable___coarse2fine_<version>_finder``)."""
    found = glob.glob(str(Path(sys.prefix) / "lib" / "python*" / "site-packages" / "__editable___coarse2fine_*_finder.py"))
    assert found, "coarse2fine is not installed in editable mode (make install)"
    return Path(found[0]).stem


def prepare(work: Path) -> Path:
    """A clone of HEAD under ``work/src`` (brought to HEAD when it exists) and the test wrapper ``work/pytest.sh``."""
    src = work / "src"
    if not src.exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "fetch", "-q", str(REPO), "HEAD"], check=True)
    subprocess.run(["git", "-C", str(src), "reset", "-q", "--hard", "FETCH_HEAD"], check=True)
    wrapper = work / "pytest.sh"
    wrapper.write_text(
        "#!/bin/bash\n"
        f"cd {src} && {sys.executable} -c \"\n"
        f"import sys, {finder_module()} as f\n"
        f"f.MAPPING.update({{k: v.replace('{REPO}', '{src}') for k, v in f.MAPPING.items()}})\n"
        "import pytest\n"
        "sys.exit(pytest.main(sys.argv[1:]))\n"
        "\" \"$@\"\n")
    wrapper.chmod(0o755)
    return src


def run_module(work: Path, src: Path, module: str, tests: str, minutes: float) -> tuple[int, int, int]:
    """(killed, completed, total mutants) of one module's session, after at most ``minutes``."""
    # a session resumes only over the same code and tests: its name carries their git blob ids
    paths = [module] + [t for t in tests.split() if t.endswith(".py")]
    blobs = subprocess.run(["git", "-C", str(src), "rev-parse", *(f"HEAD:{p}" for p in paths)], capture_output=True,
                           text=True, check=True).stdout.split()
    blob = hashlib.sha1(" ".join(blobs).encode()).hexdigest()[:10]
    name = module.replace("/", "_").removesuffix(".py")
    config, session = work / f"{name}.toml", work / f"{name}-{blob}.sqlite"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        "timeout = 120.0\nexcluded-modules = []\n"
        f'test-command = "{work}/pytest.sh -x -q -p no:cacheprovider {tests}"\n\n'
        '[cosmic-ray.distributor]\nname = "local"\n')
    bin_dir = Path(sys.executable).parent
    if not session.exists():
        subprocess.run([str(bin_dir / "cosmic-ray"), "init", str(config), str(session)], cwd=src, check=True)
    try:
        subprocess.run([str(bin_dir / "cosmic-ray"), "exec", str(config), str(session)], cwd=src,
                       timeout=minutes * 60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pass  # the session keeps what completed; a later run continues it
    report = subprocess.run([str(bin_dir / "cr-report"), str(session)], capture_output=True, text=True).stdout
    total = int(re.search(r"total jobs: (\d+)", report).group(1))
    done = re.search(r"complete: (\d+)", report)
    completed = int(done.group(1)) if done else 0
    surviving = re.search(r"surviving mutants: (\d+)", report)
    return completed - (int(surviving.group(1)) if surviving else 0), completed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=list(MODULES), help="default: all")
    parser.add_argument("--minutes", type=float, default=30.0, help="time limit per module (sessions resume)")
    parser.add_argument("--work", type=Path, default=REPO / ".c2f" / "mutation")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = prepare(args.work)
    print("| module | tests | killed / completed | score | completed / mutants |\n|---|---|---|---|---|")
    for module in args.module or list(MODULES):
        killed, completed, total = run_module(args.work, src, module, MODULES[module], args.minutes)
        score = f"{100 * killed / completed:.0f}%" if completed else "–"
        print(f"| {module} | `{MODULES[module]}` | {killed} / {completed} | {score} | {completed} / {total} |", flush=True)


if __name__ == "__main__":
    main()
