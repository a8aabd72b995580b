"""Alembic environment: runs on the connection handed over by ``storage.db.migrate``."""

from alembic import context
from sqlalchemy import create_engine

import lisplugin.storage.orm_review  # noqa: F401 - registers the review tables in Base
from lisplugin.storage.orm import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata)
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata)
    context.run_migrations()


run_migrations()
