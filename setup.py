"""Maps each top-level folder to a subpackage of the single import root ``coarse2fine``.

``find_packages`` generates the full list so that no nested subpackage silently disappears from
the wheel (an editable install would still import it); ``tests/test_packaging.py`` checks the
built wheel.
"""

from setuptools import find_packages, setup

ROOTS = {"pipelines", "preprocess", "train", "evaluate"}

package_dir = {"coarse2fine": "c2f_root"}
packages = ["coarse2fine"]
for root in sorted(ROOTS):
    for pkg in [root] + [f"{root}.{sub}" for sub in find_packages(root)]:
        name = f"coarse2fine.{pkg}"
        packages.append(name)
        package_dir[name] = pkg.replace(".", "/")

setup(packages=packages, package_dir=package_dir)
