"""Configuration, read from ``TRACKING_*`` environment variables (or a ``.env`` file).

Each entry point (a CLI command, the API's startup, a flow run) reads the settings once,
``Settings()``, and passes them down; nothing below an entry point reads the environment.
Values given to ``Settings(...)`` override the environment (``--database-url``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///tracking.db"
DEFAULT_PROCESSES = ("flows.order_cancellation:process",)


class Settings(BaseSettings):
    """All settings of the framework; each is ``TRACKING_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="TRACKING_", env_file=".env", extra="ignore")

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL of the tracking database (SQLite file or PostgreSQL).",
    )
    processes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_PROCESSES),
        description="Comma-separated import paths (module:attribute) of the processes.",
    )
    lease_seconds: int = Field(
        1800, gt=0, description="How long a claimed stage stays reserved for its worker."
    )
    api_key: str | None = Field(None, description="When set, API writes need X-API-Key.")
    api_key_for_reads: bool = Field(False, description="When true, API reads need the key too.")
    api_max_body_bytes: int = Field(1_000_000, gt=0, description="Largest accepted request body.")
    api_process_mode: str = Field(
        "inline",
        description="POST /transactions/{uuid}/process: 'inline' runs the flow in the API "
        "process, 'deployment' hands it to the process's Prefect deployment.",
    )
    send_events: bool = Field(
        True, description="Each resume run ends by sending the business outcomes not sent yet "
        "as Prefect events (tracking.prefect_events); false: only `tracking events send`.",
    )
    log_json: bool = Field(False, description="Log JSON lines instead of text.")
    log_level: str = Field("INFO", description="Log level of the tracking loggers.")

    @field_validator("processes", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("api_process_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value not in ("inline", "deployment"):
            raise ValueError("must be 'inline' or 'deployment'")
        return value


def get_settings() -> Settings:
    """Read the settings now."""
    return Settings()


# Set only inside ``use_database`` (and so reset by it): a context variable, not a global,
# so concurrent callers (API threads, tests) never see each other's database.
_database_override: ContextVar[str | None] = ContextVar("tracking_database_url", default=None)


@contextmanager
def use_database(url: str | None) -> Iterator[None]:
    """Within this block, flows started here use ``url`` as their tracking database.

    This is how the CLI (``--database-url``) and the API hand their database to a flow they
    run in-process without making it a flow parameter (Prefect stores and shows those, and a
    URL may hold a password). ``None`` changes nothing.

    Example:
        with use_database("postgresql://tracker:secret@db/tracking"):
            resume_flow(process="ORDER_CANCELLATION")
    """
    if url is None:
        yield
        return
    token = _database_override.set(url)
    try:
        yield
    finally:
        _database_override.reset(token)


def database_url(settings: Settings | None = None) -> str:
    """The tracking database of this context: ``use_database``'s, else the setting."""
    return _database_override.get() or (settings or get_settings()).database_url
