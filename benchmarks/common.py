"""What several benchmarks (and the tests) need: a free port for the servers they start, the
Team setup's auth config (docs/team-setup.md), and a disk filled to its last byte."""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path

# The Team setup page: tests and benchmarks run the server as it tells users to.
TEAM_SETUP = Path(__file__).resolve().parents[1] / "docs" / "team-setup.md"
AUTH_CONFIG_START = "cat > /srv/mlflow/basic_auth.ini <<'EOF'\n"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (closed again, for a server to bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def team_auth_config(database_uri: str, cache_seconds: int = 60) -> str:
    """The `basic_auth.ini` of the Team setup with its auth database and credential
    cache replaced: read from that page, so that what the tests and the load benchmark run
    is what users copy."""
    text = TEAM_SETUP.read_text()
    start = text.index(AUTH_CONFIG_START) + len(AUTH_CONFIG_START)
    config = text[start:text.index("\nEOF\n", start) + 1]
    for key, value in (("database_uri", database_uri), ("auth_cache_ttl_seconds", cache_seconds)):
        config, found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", config)
        if found != 1:
            raise ValueError(f"docs/team-setup.md's basic_auth.ini has no single {key} line")
    return config


def team_server_env() -> dict[str, str]:
    """The settings the Team setup exports for `mlflow server` besides its secrets
    and auth config (read from that page, as `team_auth_config`)."""
    settings = dict(re.findall(r"(?m)^export (MLFLOW_SERVER_[A-Z_]+)=(\S+)",
                               TEAM_SETUP.read_text()))
    if "MLFLOW_SERVER_ENABLE_JOB_EXECUTION" not in settings:
        raise ValueError("docs/team-setup.md no longer sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION")
    return settings


def fill(disk: Path) -> Path:
    """Write a file until `disk` has no byte left; the file (delete it to free the disk)."""
    filler = disk / ".filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 1 << 12, 1):  # down to the last byte
            try:
                while True:
                    os.write(descriptor, b"\0" * chunk)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(descriptor)
    return filler
