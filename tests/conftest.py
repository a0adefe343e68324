"""Shared pytest setup: real server processes, loaded as plugins."""
pytest_plugins = ["tests.fixtures_mongo", "tests.fixtures_llm"]
