"""Alembic environment: the farm's own engine and metadata."""

from __future__ import annotations

from alembic import context

from imgfarm.models import tables, windows  # noqa: F401 - registers their tables
from imgfarm.models.db import get_engine
from imgfarm.models.tables import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")


def run() -> None:
    engine = get_engine(url)
    with engine.connect() as conn:
        context.configure(
            connection=conn,
            target_metadata=Base.metadata,
            render_as_batch=conn.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        conn.commit()


run()
