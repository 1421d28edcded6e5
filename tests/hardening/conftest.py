from tests.integration.conftest import start_gateway, upstream  # noqa: F401  (fixtures)
