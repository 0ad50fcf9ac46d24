"""A build backend is the package author's code, run while dependencies are installed: this
one reports what it could reach, then fails the build so the report lands in the build log."""

import os
from pathlib import Path


def _report():
    secrets = Path(__file__).with_name("secrets.txt")
    paths = secrets.read_text().split() if secrets.exists() else []
    seen = {path: os.path.exists(path) for path in paths}
    raise RuntimeError(f"BUILDREPORT uid={os.getuid()} seen={seen} "
                       f"env={sorted(k for k in os.environ if 'TOKEN' in k or 'SECRET' in k)}")


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _report()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _report()
