"""Run the Alembic migrations in `migrations/` programmatically (no alembic.ini needed)."""

from importlib import resources

from alembic import command
from alembic.config import Config

from credit_engine.engine.db import sqlalchemy_url


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("credit_engine.migrations")))
    # ConfigParser interpolates %: a percent-encoded password must be escaped.
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return config


def upgrade_to_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")
