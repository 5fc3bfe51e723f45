"""The Python client's contract suite (tests/server/replicate/test_api.py) again, every server on PostgreSQL."""

from tests.server.postgres_servers import auth_server, live_server, new_database, server_factory  # noqa: F401
from tests.server.replicate.test_api import *  # noqa: F401,F403
