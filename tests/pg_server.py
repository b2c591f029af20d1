"""A real PostgreSQL for the tests: Debian's server binaries, a cluster in a temporary
folder, listening on a free loopback port and a private socket directory.

PostgreSQL refuses to run as root, so as root the cluster is made and run as the
`postgres` user (`runuser -u postgres --`); as anyone else, as that user. The
superuser is `tierq` with a password (scram-sha-256), so the tests exercise the
password path of a `postgresql://` URL. `stop()` / `start()` take the server down
and back up on the same port and data, for the outage tests.

Also runnable: `python tests/pg_server.py` starts one and prints its folder and
URL, for trying things by hand (`--stop FOLDER` stops and removes it).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from ports import free_port

USER = "tierq"
PASSWORD = "tierq-test-pw"
#: Environment variable the tests name in `password_env`.
PASSWORD_ENV = "TIERQ_TEST_PG_PASSWORD"


def pg_bin_dir() -> str | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, or None."""
    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
             if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl"))]
    if not found:
        return None
    return max(found, key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)


class PgServer:
    """One PostgreSQL cluster under `base` (created; owned by postgres when root).

    Without `base`, a fresh folder directly under the system temporary directory:
    the postgres user must be able to reach it, which a folder inside pytest's
    private (0700, root's) tmp_path tree is not.
    """

    def __init__(self, base: Path | None = None, port: int | None = None) -> None:
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="tierq-pg-"))
        bindir = pg_bin_dir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin "
                               "(apt-get install postgresql)")
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.sockdir = base / "sock"
        self.log = base / "server.log"
        self.port = port or free_port()
        self.running = False

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} failed ({done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return done

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        pwfile = self.base / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_root:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(self.sockdir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
            self.log.touch()
            shutil.chown(self.log, "postgres", "postgres")
        self._run(f"{self.bindir}/initdb", "-D", str(self.data), "-U", USER,
                  f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        pwfile.unlink()

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1"
                " -c max_connections=200 -c fsync=on")
        self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-l", str(self.log),
                  "-o", opts, "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60",
                  "stop", check=False)
        self.running = False

    def remove(self) -> None:
        """Stop the server and delete its folder."""
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres", *, password: bool = False) -> str:
        cred = f"{USER}:{PASSWORD}" if password else USER
        return f"postgresql://{cred}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with Debian's psql over TCP (a client the project does not own)."""
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        psql = os.path.join(self.bindir, "psql")
        out = subprocess.run([psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                              "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
                              "-d", database, "-c", sql],
                             check=True, capture_output=True, text=True, env=env, timeout=60)
        return out.stdout.strip()

    def create_database(self, name: str) -> str:
        """A fresh database; returns its URL (without the password)."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--stop":
        base = Path(argv[1])
        PgServer(base, port=int((base / "port").read_text())).remove()
        return 0
    server = PgServer()
    server.init()
    server.start()
    (server.base / "port").write_text(str(server.port))
    print(server.base)
    print(server.url(password=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
