"""A real Dovecot IMAP server for the e-mail tests: a private instance on loopback, started per test.

Debian's ``dovecot-imapd`` package provides the binaries (``.ci/run`` installs it). Each instance
gets its own directory under the system temp dir with a generated configuration, a passwd-file
with one test user and a password, a maildir, and a self-signed certificate made at start for
``localhost`` / ``127.0.0.1``. It listens on two free loopback ports: IMAP with STARTTLS and IMAPS.
Nothing of the system's Dovecot (``/etc/dovecot``, ``/run/dovecot``) is read or touched; the
instance runs in the foreground (``dovecot -F -c <conf>``) and is stopped by its own PID.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.procs.launch import free_port

DOVECOT = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
DOVEADM = shutil.which("doveadm") or ("/usr/bin/doveadm" if Path("/usr/bin/doveadm").exists() else None)
USER = "support@acme.test"
PASSWORD = "imap-test-password-7f3a"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (also the CA the clients trust)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class Dovecot:
    """A running private Dovecot: ``imap_port`` (STARTTLS), ``imaps_port`` (TLS), ``ca_file``."""

    def __init__(self) -> None:
        if DOVECOT is None:
            raise RuntimeError("dovecot is not installed (apt-get install dovecot-imapd)")
        self.dir = Path(tempfile.mkdtemp(prefix="replyclock-dovecot-"))
        self.dir.chmod(0o755)
        self.imap_port = free_port()
        self.imaps_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.config = self.dir / "dovecot.conf"

    def _users(self) -> tuple[int, int, str, str]:
        """(mail uid, gid, login user, internal user): Debian's service users when we are root."""
        if os.geteuid() == 0:
            mail = pwd.getpwnam("mail")
            return mail.pw_uid, mail.pw_gid, "dovenull", "dovecot"
        me = pwd.getpwuid(os.geteuid())
        return me.pw_uid, me.pw_gid, me.pw_name, me.pw_name

    def start(self) -> Dovecot:
        uid, gid, login_user, internal_user = self._users()
        self.ca_file, key = make_certificate(self.dir)
        key.chmod(0o600)
        home = self.dir / "home"
        home.mkdir()
        os.chown(home, uid, gid)
        for sub in ("run", "state"):
            (self.dir / sub).mkdir()
        (self.dir / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{home}::\n")
        self.config.write_text(
            f"""
protocols = imap
listen = 127.0.0.1
base_dir = {self.dir}/run
state_dir = {self.dir}/state
log_path = {self.dir}/dovecot.log
info_log_path = {self.dir}/dovecot.log
default_login_user = {login_user}
default_internal_user = {internal_user}
first_valid_uid = {uid}
last_valid_uid = {uid}
ssl = yes
ssl_cert = <{self.ca_file}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.dir}/passwd
}}
userdb {{
  driver = passwd-file
  args = {self.dir}/passwd
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""
        )
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace") if self.process.stdout else ""
                raise RuntimeError(f"dovecot exited at start: {output}{self.log()}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dovecot did not listen within 15 s: {self.log()}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.imaps_port), timeout=1) as raw:
                context = ssl.create_default_context(cafile=str(self.ca_file))
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    return tls.recv(100).startswith(b"* OK")
        except OSError:
            return False

    def log(self) -> str:
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def doveadm(self, *args: str) -> str:
        """Run ``doveadm`` against this instance's configuration (as the test user)."""
        assert DOVEADM is not None
        done = subprocess.run(
            [DOVEADM, "-c", str(self.config), *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} failed: {done.stderr}{done.stdout}")
        return done.stdout

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
