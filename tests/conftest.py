"""Shared pytest setup: real server processes, loaded as plugins."""
pytest_plugins = ["tests.fixtures_mongo", "tests.fixtures_llm"]


import pytest

#: Tests that change host-wide state (a real systemd under systemd-nspawn, cgroups,
#: network namespaces on a fixed private /24): one xdist process runs them all.
HOST_WIDE = ("test_systemd_smsd.py", "test_nspawn_harness.py", "test_partition.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the host-wide tests; start the longest, then the slow ones first (the run ends
    when the longest does)."""
    for item in items:
        if item.path.name in HOST_WIDE:
            item.add_marker(pytest.mark.xdist_group("host"))
    items.sort(key=lambda item: (item.get_closest_marker("longest") is None,
                                 item.get_closest_marker("slow") is None))
