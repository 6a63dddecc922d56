"""scripts/setup.sh and .ci/run, exercised in a scratch copy of the repository with stub commands (a fake
venv python, no apt-get), so that nothing is installed and the tests take a second."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pcavs_live.cli.config import PROJECT_ROOT

TEST_COMMAND = "bash scripts/setup.sh --dev && .venv/bin/python -m pytest -q"
SETUP = PROJECT_ROOT / "scripts" / "setup.sh"
CI_RUN = PROJECT_ROOT / ".ci" / "run"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)


# --------------------------------------------------------------------------- setup.sh
@pytest.fixture
def setup_repo(tmp_path):
    """A copy of setup.sh and the requirement files, a stub .venv/bin/python that logs its arguments, and
    stubs that make the machine look like a non-root one without sudo (so apt-get must not run)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(SETUP, repo / "scripts" / "setup.sh")
    for name in ("requirements.txt", "requirements-dev.txt", "pyproject.toml"):
        shutil.copy2(PROJECT_ROOT / name, repo / name)
    log = tmp_path / "calls.log"
    stub(repo / ".venv" / "bin" / "python",
         f'echo "python $*" >> "{log}"\n[[ "${{1:-}}" == "-" ]] && cat >/dev/null\nexit 0\n')
    bin_dir = tmp_path / "bin"
    stub(bin_dir / "dpkg-query", "echo not-installed\n")
    stub(bin_dir / "id", 'if [[ "${1:-}" == "-u" ]]; then echo 1000; else exec /usr/bin/id "$@"; fi\n')
    stub(bin_dir / "sudo", "exit 1\n")
    stub(bin_dir / "apt-get", f'echo "apt-get $*" >> "{log}"\nexit 1\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CI": "true"}
    return repo, log, env


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_setup_without_apt_prints_packages_and_is_idempotent(setup_repo):
    repo, log, env = setup_repo
    first = run(["bash", "scripts/setup.sh", "--dev"], repo, env)
    assert first.returncode == 0, first.stderr
    assert "install these packages by hand" in first.stderr
    for pkg in ("libportaudio2", "espeak-ng", "sox", "chromium", "pulseaudio", "pulseaudio-utils"):
        assert pkg in first.stderr
    pip_calls = [c for c in calls(log) if "-m pip install" in c]
    assert any(c.endswith("-r requirements.txt") for c in pip_calls)
    assert any(c.endswith("-r requirements-dev.txt") for c in pip_calls)
    assert any("--no-deps" in c and c.endswith("-e .") for c in pip_calls)  # registers .venv/bin/pcavs-live
    assert not any(c.startswith("apt-get") for c in calls(log))
    assert "setup complete." in first.stdout

    log.unlink()
    second = run(["bash", "scripts/setup.sh", "--dev"], repo, env)
    assert second.returncode == 0, second.stderr
    assert not [c for c in calls(log) if "-m pip" in c]          # nothing reinstalled
    assert "already done: requirements.txt" in second.stdout

    with open(repo / "requirements.txt", "a") as fh:                 # a changed pin is noticed
        fh.write("tqdm\n")
    third = run(["bash", "scripts/setup.sh"], repo, env)
    assert third.returncode == 0, third.stderr
    assert any(c.endswith("-r requirements.txt") for c in calls(log) if "-m pip install" in c)
    assert "chromium" not in third.stderr                            # test-only packages need --dev


def test_one_package_apt_cannot_install_does_not_keep_the_others_out(setup_repo, tmp_path):
    """As root, an apt-get install of the whole list fails on one package (simple-whip-server beside a
    non-Debian nodejs): every other package is still installed, one at a time, and only the failing one
    is named."""
    repo, log, env = setup_repo
    bin_dir = tmp_path / "bin"
    stub(bin_dir / "id", 'if [[ "${1:-}" == "-u" ]]; then echo 0; else exec /usr/bin/id "$@"; fi\n')
    stub(bin_dir / "apt-get", f'echo "apt-get $*" >> "{log}"\n[[ "$*" == *simple-whip-server* ]] && exit 100\nexit 0\n')
    result = run(["bash", "scripts/setup.sh", "--dev"], repo, env)
    assert result.returncode == 0, result.stderr
    singles = [c.rsplit(" ", 1)[1] for c in calls(log) if c.startswith("apt-get install") and c.count(" ") == 5]
    assert "chromium" in singles and "janus" in singles and "simple-whip-server" in singles
    warning = [line for line in result.stderr.splitlines() if "install these packages by hand" in line]
    assert len(warning) == 1 and warning[0].endswith(": simple-whip-server")


def test_simple_whip_server_is_unpacked_into_deps_when_apt_cannot_install_it(setup_repo, tmp_path):
    """As root, with no working system copy: setup.sh --dev downloads the Debian package (no install),
    unpacks it into .deps/simple-whip-server, installs its Node modules there from the lock in
    scripts/simple-whip-server/, and skips all of that on the next run."""
    repo, log, env = setup_repo
    shutil.copytree(PROJECT_ROOT / "scripts" / "simple-whip-server", repo / "scripts" / "simple-whip-server")
    bin_dir = tmp_path / "bin"
    stub(bin_dir / "id", 'if [[ "${1:-}" == "-u" ]]; then echo 0; else exec /usr/bin/id "$@"; fi\n')
    stub(bin_dir / "apt-get", f'''echo "apt-get $*" >> "{log}"
[[ "$1" == download ]] && {{ echo deb > simple-whip-server_0.0~git20230201-1_all.deb; exit 0; }}
[[ "$*" == *simple-whip-server* ]] && exit 100
exit 0
''')
    stub(bin_dir / "dpkg-deb", f'''echo "dpkg-deb $*" >> "{log}"
mkdir -p "$3/usr/share/simple-whip-server/src" && echo "// server" > "$3/usr/share/simple-whip-server/src/server.js"
ln -s /etc/simple-whip-server/config.js "$3/usr/share/simple-whip-server/src/config.js"
''')
    stub(bin_dir / "npm", f'echo "npm $* in $(pwd)" >> "{log}"\nmkdir -p node_modules/express\n')
    env = {**env, "SIMPLE_WHIP_SERVER_SYSTEM_DIR": str(tmp_path / "no-system-copy")}

    first = run(["bash", "scripts/setup.sh", "--dev"], repo, env)
    assert first.returncode == 0, first.stderr
    local = repo / ".deps" / "simple-whip-server"
    assert (local / "src" / "server.js").is_file() and not (local / "src" / "config.js").exists()
    assert (local / "package-lock.json").read_text() == (
        PROJECT_ROOT / "scripts" / "simple-whip-server" / "package-lock.json").read_text()
    assert (local / "node_modules" / "express").is_dir()
    assert any(c == "apt-get download -q simple-whip-server" for c in calls(log))
    assert any(c.startswith("npm ci --omit=dev") and c.endswith(f"in {local}") for c in calls(log))

    log.unlink()
    second = run(["bash", "scripts/setup.sh", "--dev"], repo, env)
    assert second.returncode == 0, second.stderr
    assert f"already done: simple-whip-server in {local}" in second.stdout
    assert not [c for c in calls(log) if c.startswith(("apt-get download", "dpkg-deb", "npm"))]


def test_without_apt_a_missing_simple_whip_server_is_one_warning(setup_repo, tmp_path):
    repo, log, env = setup_repo
    env = {**env, "SIMPLE_WHIP_SERVER_SYSTEM_DIR": str(tmp_path / "no-system-copy")}
    result = run(["bash", "scripts/setup.sh", "--dev"], repo, env)
    assert result.returncode == 0, result.stderr
    assert not any(c.startswith("apt-get") for c in calls(log))
    assert len([line for line in result.stderr.splitlines() if "simple-whip-server is missing" in line]) == 1
    assert not (repo / ".deps").exists()


def test_setup_options(setup_repo):
    repo, _log, env = setup_repo
    helped = run(["bash", "scripts/setup.sh", "--help"], repo, env)
    assert helped.returncode == 0 and "--dev" in helped.stdout
    wrong = run(["bash", "scripts/setup.sh", "--frobnicate"], repo, env)
    assert wrong.returncode == 2 and "unknown option '--frobnicate'" in wrong.stderr


# --------------------------------------------------------------------------- .ci/run
@pytest.fixture
def ci_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(CI_RUN, repo / ".ci" / "run")
    log = tmp_path / "calls.log"
    stub(repo / "scripts" / "setup.sh", f'echo "setup $*" >> "{log}"\nexit "${{SETUP_RC:-0}}"\n')
    stub(repo / ".venv" / "bin" / "python", f'echo "python $*" >> "{log}"\nexit "${{PYTEST_RC:-0}}"\n')
    return repo, log


@pytest.mark.parametrize("setup_rc, pytest_rc, expected", [(0, 0, 0), (0, 1, 1), (0, 5, 1), (3, 0, 3)])
def test_ci_run_exit_codes(ci_repo, setup_rc, pytest_rc, expected):
    repo, log = ci_repo
    env = {**os.environ, "CI": "true", "SETUP_RC": str(setup_rc), "PYTEST_RC": str(pytest_rc)}
    result = run(["bash", ".ci/run"], repo, env)
    assert result.returncode == expected
    expected_calls = ["setup --dev"] + (["python -m pytest -q"] if setup_rc == 0 else [])
    assert calls(log) == expected_calls
    assert ("collected no tests" in result.stderr) == (pytest_rc == 5)


def test_ci_runs_the_documented_command():
    # The command itself (not a comment mentioning it) starts a line of .ci/run.
    assert any(line.startswith(TEST_COMMAND) for line in CI_RUN.read_text().splitlines())
    readme = PROJECT_ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not written yet")
    assert TEST_COMMAND in readme.read_text(), "README.md must show the exact test command that CI runs"
