"""Only what pyproject.toml cannot say: ship the top-level alembic/ folder as storage.migrations."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["bot", "bot.*", "connectors", "connectors.*", "storage", "storage.*"]),
        "storage.migrations",
        "storage.migrations.versions",
    ],
    package_dir={"storage.migrations": "alembic"},
)
