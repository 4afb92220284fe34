"""A Docker engine of the container tests' own (not a test module).

`Engine.start()` installs Debian's `docker.io` and `debootstrap` when they are missing, starts a
`dockerd` with its own data root, exec root, pid file and socket, and `Engine.stop()` ends that
one process by its PID. The data root lives outside the clone (under ~/.cache/convstack), so
images and BuildKit's pip cache survive from one run to the next. No image can be pulled here:
`base_image()` builds Debian bookworm with debootstrap from the mirror apt uses and imports it,
tagged by a hash of its inputs, once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_DIR = Path(
    os.environ.get("CONVSTACK_CONTAINER_STATE", Path.home() / ".cache" / "convstack" / "containers")
)
# Short: containerd's sockets live under the exec root, and unix socket paths are limited.
EXEC_ROOT = Path("/run/convstack-test-docker")
SUITE = "bookworm"
# Python 3.11 is bookworm's python3; bash runs the serving probe; ca-certificates lets pip
# reach the package index over TLS.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "bash")
HOST_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}
# The host's trust store, which pip's TLS (PIP_CERT) uses: package index traffic here may pass a
# proxy whose certificate only the host trusts, so the base image gets the same bundle.
HOST_CA_BUNDLE = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
CA_BUNDLE_IN_IMAGE = "etc/ssl/certs/ca-certificates.crt"
START_TIMEOUT_SECONDS = 60


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class EngineUnavailable(RuntimeError):
    """No Docker engine can run here; the message says why (the tests skip with it)."""


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses for `SUITE` (deb822 .sources or one-line sources.list)."""
    files = sorted((sources_dir / "sources.list.d").glob("*.sources"))
    for path in files:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if re.match(r"^\w[\w-]*:", line)
            )
            suites = fields.get("Suites", "").split()
            if SUITE in suites and fields.get("Types", "").split().count("deb"):
                return fields["URIs"].split()[0]
    for path in [sources_dir / "sources.list", *sorted(sources_dir.glob("sources.list.d/*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if match and match.group(2) == SUITE:
                    return match.group(1)
    raise EngineUnavailable(f"no apt source for Debian {SUITE} under {sources_dir}")


def base_tag(mirror: str, ca_bundle: bytes) -> str:
    """The base image's tag: a hash of everything that goes into it."""
    ca_hash = hashlib.sha256(ca_bundle).hexdigest()
    inputs = "\n".join([SUITE, "minbase", mirror, *BASE_PACKAGES, ca_hash])
    return f"convstack-test-debian:{SUITE}-{hashlib.sha256(inputs.encode()).hexdigest()[:12]}"


def _install_missing_host_packages() -> None:
    missing = [package for tool, package in HOST_PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise EngineUnavailable(f"{' and '.join(missing)} missing and not root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:  # the package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineUnavailable(f"apt-get install {' '.join(missing)} failed: {last}")


@dataclass
class Engine:
    """One dockerd of our own; `run()` runs its client against it."""

    state_dir: Path = STATE_DIR
    exec_root: Path = EXEC_ROOT
    process: subprocess.Popen | None = None
    lock: object = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.exec_root / "docker.sock"

    @property
    def client(self) -> str:
        # The client shipped next to the daemon: a newer client elsewhere on PATH would need
        # the buildx plugin for BuildKit (cache and bind mounts) and fall back to the legacy
        # builder without it.
        dockerd = shutil.which("dockerd")
        beside = Path(dockerd).parent.parent / "bin" / "docker" if dockerd else None
        return str(beside) if beside and beside.exists() else "docker"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}

    def run(self, *args: str, check: bool = True, timeout: float = 900, **kwargs):
        """`docker ARGS` against our daemon; output captured as text."""
        result = subprocess.run(
            [self.client, *args], env=self.env(), capture_output=True, text=True,
            timeout=timeout, check=False, **kwargs,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args[:3])} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result

    def start(self) -> None:
        if os.geteuid() != 0:
            raise EngineUnavailable("dockerd needs root here (rootless Docker is not set up)")
        _install_missing_host_packages()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.exec_root.mkdir(parents=True, exist_ok=True)
        # One test session at a time owns this data root (another one waits for it).
        self.lock = open(self.state_dir / "engine.lock", "w")  # noqa: SIM115 (held until stop)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        pidfile = self.exec_root / "dockerd.pid"
        if pidfile.is_file() and not _alive(pidfile):
            pidfile.unlink()  # left by a session that was killed with its dockerd
        if pidfile.is_file():
            raise EngineUnavailable(
                f"a dockerd of an earlier session still runs (pid file {pidfile}); stop it first"
            )
        log = self.state_dir / "dockerd.log"
        started = time.monotonic()
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [
                    "dockerd",
                    f"--data-root={self.state_dir / 'docker'}",
                    f"--exec-root={self.exec_root}",
                    f"--pidfile={self.exec_root / 'dockerd.pid'}",
                    f"--host=unix://{self.socket}",
                    "--storage-driver=overlay2",
                ],
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        while time.monotonic() - started < START_TIMEOUT_SECONDS:
            if self.process.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                self.stop()
                raise EngineUnavailable(f"dockerd exited {self.process.returncode}: {tail[0]}")
            if self.socket.exists() and self.run("version", check=False).returncode == 0:
                self.timings["dockerd_start_seconds"] = time.monotonic() - started
                return
            time.sleep(0.1)
        self.stop()
        raise EngineUnavailable(f"dockerd did not answer within {START_TIMEOUT_SECONDS}s ({log})")

    def stop(self) -> None:
        """End our dockerd (it stops its containerd and containers) by its PID."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def prune(self, keep: list[str]) -> None:
        """Drop our images of earlier inputs (other tags of the same repositories) and untagged
        ones, so the data root does not grow with every source change."""
        repositories = {tag.rsplit(":", 1)[0] for tag in keep}
        listed = self.run("image", "ls", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
        stale = [t for t in listed if t.rsplit(":", 1)[0] in repositories and t not in keep]
        if stale:
            self.run("image", "rm", *stale, check=False)
        self.run("image", "prune", "--force", check=False)

    def has_image(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def image_size_mib(self, tag: str) -> float:
        size = self.run("image", "inspect", "--format", "{{.Size}}", tag).stdout
        return int(size) / 2**20

    def base_image(self) -> str:
        """Debian bookworm (minbase, Python 3.11) imported from debootstrap, built once."""
        mirror = apt_mirror()
        ca_bundle = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b""
        tag = base_tag(mirror, ca_bundle)
        if self.has_image(tag):
            self.timings["base_image_seconds"] = 0.0
            return tag
        started = time.monotonic()
        rootfs = self.state_dir / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        debootstrap = [
            "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
            SUITE, str(rootfs), mirror,
        ]  # fmt: skip
        result = subprocess.run(debootstrap, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = result.stdout[-3000:]
            raise AssertionError(f"debootstrap exited {result.returncode}:\n{tail}")
        try:
            if ca_bundle:
                (rootfs / CA_BUNDLE_IN_IMAGE).write_bytes(ca_bundle)
            # Downloaded packages are no part of the image.
            for package in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                package.unlink()
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(
                [self.client, "import", "-", tag], stdin=tar.stdout, env=self.env(),
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            tar.stdout.close()
            tar.wait()
            if imported.returncode != 0 or tar.returncode != 0:
                raise AssertionError(f"docker import failed: {imported.stderr[-2000:]}")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        self.timings["base_image_seconds"] = time.monotonic() - started
        return tag

    def build(self, tag: str, dockerfile: Path, context: Path, **build_args: str) -> float:
        """`docker build`; the seconds it took."""
        args = [f"--build-arg={name}={value}" for name, value in build_args.items()]
        started = time.monotonic()
        self.run("build", "--progress=plain", "-f", str(dockerfile), "-t", tag, *args, str(context))
        return time.monotonic() - started
