"""The host a bench runs on: CPU, RAM, kernel, Python, SQLite, filesystems, server versions.

Apart from the report because the ``journal`` benchmark also names the filesystem
its journal directory is on.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
from pathlib import Path


def filesystem_of(path: Path) -> str:
    """``"ext4 (/dev/vda on /)"``: the filesystem holding ``path``."""
    try:
        import psutil
        path = Path(path).resolve()
        best = None
        for part in psutil.disk_partitions(all=True):
            mp = Path(part.mountpoint)
            if path == mp or mp in path.parents:
                if best is None or len(str(mp)) > len(str(best.mountpoint)):
                    best = part
        if best is not None:
            return f"{best.fstype} ({best.device} on {best.mountpoint})"
    except Exception:  # pragma: no cover - psutil missing or odd mounts
        pass
    return "unknown"


def machine_info(state_root: Path) -> dict[str, str]:
    """Cores, RAM, CPU model, kernel, Python, filesystem of the state dir, server versions."""
    import psutil
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    from importlib import metadata
    for dist in ("SecantusDB", "pymongo", "openai"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "CPU": f"{model}, {psutil.cpu_count(logical=True)} logical CPUs "
               f"({psutil.cpu_count(logical=False) or '?'} physical)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite": sqlite3.sqlite_version,
        "State dir filesystem": filesystem_of(state_root),
        "MongoDB-wire server": f"SecantusDB {versions['SecantusDB']} (`secantusd-py`, loopback)",
        "Clients": f"pymongo {versions['pymongo']}, openai {versions['openai']}",
        "Load average at start": load,
    }
