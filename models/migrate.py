"""`imgfarm db upgrade`: Alembic migrations, found inside the installed package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from imgfarm.config.settings import get_settings
from imgfarm.models.db import get_engine


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def current(url: str | None = None) -> str | None:
    with get_engine(url or get_settings().database_url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def revision(message: str, url: str | None = None) -> None:
    """Autogenerate a new migration (developers: `imgfarm db revision -m ...`)."""
    command.revision(alembic_config(url), message=message, autogenerate=True)
