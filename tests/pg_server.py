"""A throwaway PostgreSQL server for the shared-storage tests, started from the installed binaries
(initdb, pg_ctl: /usr/lib/postgresql/*/bin or PATH) in a temporary folder, on a free local port,
trust authentication, stopped afterwards. As root it runs as the `postgres` user (PostgreSQL
refuses to run as root), which the Debian/Ubuntu package creates."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PgServer:
    url: str  # postgresql+psycopg2://mergelab:PASSWORD@127.0.0.1:PORT/postgres (trust: any password)
    data: Path
    pg_ctl: str
    user: str | None

    def stop(self) -> None:
        _run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"], self.user, check=False)


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: [int(x) for x in p.split("/")[4].split(".") if x.isdigit()])
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _run(cmd: list[str], user: str | None, check: bool = True) -> subprocess.CompletedProcess:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable() -> str | None:
    """Why no throwaway server can start here, else None."""
    if _bin_dir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) are installed (apt-get install postgresql)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "the psycopg2 driver is not installed (pip install psycopg2-binary)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root without `runuser` to start the server as `postgres`"
    return None


def start(password: str = "s3cret") -> PgServer:
    """A running server in a new temporary folder (its own, so that the `postgres` user can reach
    it: pytest's tmp_path is private to root); stop() it, then remove .data.parent."""
    import tempfile

    bins = _bin_dir()
    user = "postgres" if os.geteuid() == 0 else None
    tmp = Path(tempfile.mkdtemp(prefix="mergelab-pg-"))
    data = tmp / "pgdata"
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        os.chmod(tmp, 0o755)
    _run([str(bins / "initdb"), "-D", str(data), "-A", "trust", "-U", "mergelab", "--no-sync", "-E", "UTF8"], user)
    port = _free_port()
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -F"
    _run([str(bins / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(tmp / "log"), "-w", "-t", "60", "start"], user)
    return PgServer(f"postgresql+psycopg2://mergelab:{password}@127.0.0.1:{port}/postgres", data,
                    str(bins / "pg_ctl"), user)
