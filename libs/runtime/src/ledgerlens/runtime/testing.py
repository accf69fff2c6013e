"""Test fixtures for NATS, PostgreSQL and Redis (pytest plugin, see issue #2)."""
