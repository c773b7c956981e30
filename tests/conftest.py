"""Fixtures that hand tests real, running servers (see tests/services.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from hypothesis import settings

# tests/ has no __init__.py, so pytest (prepend import mode) puts tests/ itself on
# sys.path and the helper module imports as top-level `services`.
from services import (
    BinaryNotFoundError,
    InfluxDB1,
    Mosquitto,
    Postgres,
    Redis,
    Service,
    VictoriaMetrics,
)

# The suite is reproducible: every property draws the same examples on every run, so CI fails
# only when the code changed, never because a run happened upon a new input. Exploring new
# inputs is `make fuzz`'s job (HYPOTHESIS_PROFILE=explore: random, many more examples); what
# it finds becomes an @example here.
settings.register_profile("suite", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

S = TypeVar("S", bound=Service)

# Tests depending (directly or through other fixtures) on any of these get the
# `services` marker; everything else is a `unit` test.
SERVICE_FIXTURES = frozenset(
    {"mosquitto", "victoria_metrics", "influxdb1", "redis_server", "postgres", "services"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("services"):
            continue
        uses_services = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.services if uses_services else pytest.mark.unit)


def start_service(factory: Callable[[], S]) -> S:
    # A missing server must fail the test loudly, never skip it: a suite that silently
    # skips its integration tests looks green while testing nothing.
    missing = None
    try:
        service = factory()
    except BinaryNotFoundError as exc:
        missing = str(exc)
    if missing is not None:
        # Outside the except block, so the report shows just the message, not a chain.
        pytest.fail(missing, pytrace=False)
    try:
        return service.start()
    except BaseException:
        service.close()
        raise


def _shared(factory: Callable[[], S]) -> Iterator[S]:
    service = start_service(factory)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """Broker shared by the whole session; use `unique` topic prefixes."""
    yield from _shared(Mosquitto)


@pytest.fixture(scope="session")
def victoria_metrics() -> Iterator[VictoriaMetrics]:
    """VictoriaMetrics shared by the session; use unique measurement/tag values."""
    yield from _shared(VictoriaMetrics)


@pytest.fixture(scope="session")
def influxdb1() -> Iterator[InfluxDB1]:
    """InfluxDB 1.x shared by the session; create a `unique` database per test."""
    yield from _shared(InfluxDB1)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    """Redis shared by the session; use `unique` key prefixes."""
    yield from _shared(Redis)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """PostgreSQL shared by the session (database `ingestd`); use unique table names."""
    yield from _shared(Postgres)


class ServiceFactory:
    """Starts private servers for one test; all are closed when the test ends.

    For fault tests that stop, kill or restart their server, which would break other
    tests sharing a session instance.
    """

    def __init__(self) -> None:
        self._started: list[Service] = []

    def _add(self, factory: Callable[[], S]) -> S:
        service = start_service(factory)
        self._started.append(service)
        return service

    def mosquitto(self, extra_config: str = "", **kwargs: Any) -> Mosquitto:
        return self._add(lambda: Mosquitto(extra_config=extra_config, **kwargs))

    def victoria_metrics(self, **kwargs: Any) -> VictoriaMetrics:
        return self._add(lambda: VictoriaMetrics(**kwargs))

    def influxdb1(self, **kwargs: Any) -> InfluxDB1:
        return self._add(lambda: InfluxDB1(**kwargs))

    def redis(self, **kwargs: Any) -> Redis:
        return self._add(lambda: Redis(**kwargs))

    def postgres(self, **kwargs: Any) -> Postgres:
        return self._add(lambda: Postgres(**kwargs))

    def close(self) -> None:
        errors: list[BaseException] = []
        for service in reversed(self._started):
            try:
                service.close()
            except Exception as exc:
                errors.append(exc)
        self._started.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def services() -> Iterator[ServiceFactory]:
    """Factory for private server instances, e.g. `services.mosquitto(extra_config=...)`."""
    factory = ServiceFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def unique() -> str:
    """Short unique token for topic prefixes, database names, keys."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def pg_empty(postgres: Postgres, unique: str) -> str:
    """URL of a new, empty database on the session's PostgreSQL."""
    return postgres.create_database(f"t_{unique}")


@pytest.fixture
def pg_url(pg_empty: str) -> str:
    """URL of a new database on the session's PostgreSQL with ingestd's schema applied."""
    from ingestd.store.postgres import migrate  # noqa: PLC0415

    with psycopg.connect(pg_empty, autocommit=True) as conn:
        migrate(conn)
    return pg_empty
