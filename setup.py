"""Build hook: the wheel carries the shipped models and default config as package data.

``models/`` and ``config/`` stay at the top of the checkout (where the README, training and tests
expect them); at build time they are copied into ``lisplugin/_shipped/`` inside the wheel, which
``lisplugin.config`` falls back to when it runs outside the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("models", "config")


class BuildWithShippedData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        target = Path(self.build_lib) / "lisplugin" / "_shipped"
        for name in SHIPPED:
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(ROOT / name, target / name)


setup(cmdclass={"build_py": BuildWithShippedData})
