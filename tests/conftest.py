"""Test-wide fixtures: real services (Azurite, PostgreSQL) started as local processes."""

pytest_plugins = [
    "tests.fixtures.azurite",
    "tests.fixtures.postgres",
]
