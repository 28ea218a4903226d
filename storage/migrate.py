"""Run Alembic migrations from code (`replyclock db upgrade`, tests, the demo)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy import Engine

from alembic import command

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the project's `alembic/` directory."""
    ini = PROJECT_ROOT / "alembic.ini"
    scripts = PROJECT_ROOT / "alembic"
    if not scripts.is_dir():
        raise FileNotFoundError(
            f"migrations not found at {scripts}: run replyclock from its source checkout (pip install -e .)"
        )
    config = Config(str(ini)) if ini.exists() else Config()
    config.set_main_option("script_location", str(scripts))
    if url:
        config.attributes["url"] = url
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database behind `engine` up to `revision`."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
