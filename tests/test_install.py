"""Installing pcavs-live as a package: the wheel installs into a fresh virtual environment and runs from
outside the source tree; pyproject.toml, requirements.txt, setup.sh and the code agree on dependencies;
installed and checkout layouts find their files; `pcavs-live fetch` gets and verifies every run-time file
(from a local HTTP server standing in for the real hosts) and says where each missing one goes."""
from __future__ import annotations

import ast
import functools
import hashlib
import http.server
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import pcavs_live.cli.config
from pcavs_live.cli import doctor, fetch
from pcavs_live.cli.paths import BUNDLED_ROOT, home_dir, user_data_dir
from pcavs_live.common.download import Weight
from tests.conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
NETS = ("G", "V", "E", "A_sync")


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


# --------------------------------------------------------------------------- dependencies agree
def test_requirements_txt_pins_satisfy_pyproject():
    locked = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.txt must pin exactly: {line}"
            locked[canonicalize_name(req.name)] = spec.version
    for name, req in _requirements(PYPROJECT["project"]["dependencies"]).items():
        assert name in locked, f"{name} is a dependency in pyproject.toml but not pinned in requirements.txt"
        assert req.specifier.contains(locked[name]), f"requirements.txt's {name}=={locked[name]} violates {req}"
    assert "lws" not in locked and "cython" not in locked  # tests only: the dev extra


def test_dev_extra_matches_setup_script_and_requirements_dev():
    extras = PYPROJECT["project"]["optional-dependencies"]
    dev = _requirements(extras["dev"])
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    for name, variable in (("lws", "LWS_VERSION"), ("cython", "CYTHON_VERSION")):
        pinned = re.search(rf"^{variable}=(\S+)$", setup, re.M).group(1)
        assert str(dev[name].specifier) == f"=={pinned}", name
    for line in (REPO_ROOT / "requirements-dev.txt").read_text().splitlines():
        if line.strip() and not line.startswith(("-r", "#")):
            req = Requirement(line)
            pinned = {**_requirements(extras["cluster"]), **dev}     # CI runs the cluster tests too
            assert pinned[canonicalize_name(req.name)].specifier == req.specifier, line


def test_doctor_suggests_the_pinned_torch():
    deps = _requirements(PYPROJECT["project"]["dependencies"])
    assert doctor.TORCH_PINS == f"torch{deps['torch'].specifier} torchvision{deps['torchvision'].specifier}"


# What a wheel puts at the top of site-packages (besides its .dist-info).
WHEEL_TOP_LEVEL = ("pcavs_live", "capture", "pcavs", "stream", "configs", "assets")


def _packaged_sources() -> list[Path]:
    packages = ("pcavs_live", "capture", "pcavs", "stream")
    return [p for package in packages for p in (REPO_ROOT / package).rglob("*.py")]


def test_runtime_dependencies_are_exactly_what_the_code_imports():
    """Every third-party module the installed packages import (at the top or inside a function) comes from
    a declared dependency, and every declared dependency is imported by something."""
    ours = set(WHEEL_TOP_LEVEL)
    imported: set[str] = set()
    for path in _packaged_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - ours - set(sys.stdlib_module_names) - {"__future__"}
    providers = importlib.metadata.packages_distributions()
    declared = set(_requirements(PYPROJECT["project"]["dependencies"]))
    extras = PYPROJECT["project"]["optional-dependencies"]
    optional = set(_requirements(extras["cluster"] + extras["gpu"]))  # imported lazily
    used = set()
    for module in sorted(third_party):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists & (declared | optional), \
            f"the code imports {module} (from {sorted(dists)}) but pyproject.toml does not declare it"
        used |= dists & (declared | optional)
    assert declared | optional == used, f"declared but never imported: {sorted((declared | optional) - used)}"


# --------------------------------------------------------------------------- where files are
@pytest.mark.skipif(sys.platform != "linux", reason="checks the Linux (XDG) convention; platformdirs tests the others")
def test_user_data_dir_follows_the_os_convention(tmp_path, monkeypatch):
    """platformdirs' per-user data folder, named after the program, and $PCAVS_LIVE_HOME above it."""
    monkeypatch.setenv("HOME", str(tmp_path / "u"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert user_data_dir() == tmp_path / "u" / ".local" / "share" / "pcavs-live"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert user_data_dir() == tmp_path / "xdg" / "pcavs-live"
    assert home_dir({"PCAVS_LIVE_HOME": str(tmp_path / "mine")}) == tmp_path / "mine"


def test_installed_layout_writes_to_home_and_reads_bundled_files(tmp_path, monkeypatch):
    """An installed package's relative paths: the user's folder first, the bundled file as a fallback."""
    home = tmp_path / "home"
    monkeypatch.setattr(pcavs_live.cli.config, "HOME_DIR", home)
    config = pcavs_live.cli.config.load_config(None, {})
    assert config.model.checkpoint_dir == home / "checkpoints" / "demo"
    assert config.output.file == home / "out" / "session.mp4"
    assert config.identity.photo == BUNDLED_ROOT / "assets" / "sample" / "astronaut.png"
    own = home / "assets" / "sample" / "astronaut.png"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    assert pcavs_live.cli.config.load_config(None, {}).identity.photo == own
    # command-line paths stay relative to the current directory, with no fallback
    assert pcavs_live.cli.config.load_config(None, {"identity.photo": "assets/sample/astronaut.png"},
                                  cwd=tmp_path).identity.photo == tmp_path / "assets" / "sample" / "astronaut.png"


# --------------------------------------------------------------------------- fetch
@pytest.fixture
def site(tmp_path):
    """A local web server: stand-in face weights (registry entries with their SHA-256), one whose content
    does not match its registered hash, and a demo.zip of stand-in checkpoints."""
    root = tmp_path / "site"
    root.mkdir()
    files = {}
    for stem, ext, body in (("s3fd", ".pth", b"detector" * 1000), ("2DFAN4", ".pth.tar", b"landmarks" * 1000)):
        name = f"{stem}-{hashlib.sha256(body).hexdigest()[:10]}{ext}"
        (root / name).write_bytes(body)
        files[name] = hashlib.sha256(body).hexdigest()
    (root / "s3fd-0123456789.pth").write_bytes(b"not the detector")
    with zipfile.ZipFile(root / "demo.zip", "w") as z:
        for net in NETS:
            z.writestr(f"demo/latest_net_{net}.pth", f"stand-in {net}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        yield base, {name: Weight(name, digest, base + name) for name, digest in files.items()}
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()


def present(folder: Path) -> dict[str, str]:
    """Stand-in for describe_checkpoints (the real one loads the files into the networks)."""
    return {net: "present" if (folder / f"latest_net_{net}.pth").is_file() else "missing" for net in NETS}


def test_fetch_gets_and_verifies_everything_then_needs_no_network(tmp_path, site, capsys):
    base, files = site
    ckpt, weights = tmp_path / "ckpt", tmp_path / "weights"
    outcomes = fetch.fetch_all(base + "demo.zip", ckpt, weights, progress=False, files=files, describe=present)
    assert [o.ok for o in outcomes] == [True, True, True], outcomes
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(f"latest_net_{n}.pth" for n in NETS)
    assert fetch.landmark_status(weights, files) == {name: "ok" for name in files}
    fetch.report(outcomes, "pcavs-live")
    assert "runs without a network now" in capsys.readouterr().out

    dead = {name: Weight(name, w.sha256, "http://127.0.0.1:9/" + name) for name, w in files.items()}  # nobody there
    again = fetch.fetch_all("http://127.0.0.1:9/demo.zip", ckpt, weights, progress=False, files=dead, describe=present)
    assert all(o.ok and "already there" in o.detail for o in again)


def test_fetch_refuses_a_file_whose_hash_does_not_match_the_registry(tmp_path, site):
    base, _ = site
    weights = tmp_path / "weights"
    expected = hashlib.sha256(b"the detector").hexdigest()
    outcome = fetch.fetch_weight_file(Weight("s3fd-0123456789.pth", expected, base + "s3fd-0123456789.pth"),
                                      weights, False)
    assert not outcome.ok and "SHA-256 does not match" in outcome.detail
    assert not weights.exists() or not any(weights.iterdir())  # nothing half-verified left behind
    assert outcome.manual == f"download {base}s3fd-0123456789.pth and save it as {weights / 's3fd-0123456789.pth'}"


def test_fetch_offline_prints_one_line_per_missing_file(tmp_path, capsys):
    files = {name: Weight(name, w.sha256, f"http://127.0.0.1:9/{name}") for name, w in fetch.landmark_files().items()}
    ckpt, weights = tmp_path / "ckpt", tmp_path / "weights"
    outcomes = fetch.fetch_all("http://127.0.0.1:9/demo.zip", ckpt, weights, prog="pcavs-live", progress=False,
                               files=files, describe=present)
    with pytest.raises(fetch.FetchError) as info:
        fetch.report(outcomes, "pcavs-live")
    assert "3 of 3 downloads failed" in str(info.value) and "pcavs-live fetch" in info.value.hint
    lines = capsys.readouterr().out.splitlines()
    by_hand = lines[lines.index("to finish by hand:") + 1:]
    assert len(by_hand) == 3
    assert "demo.zip" in by_hand[0] and "pcavs-live fetch --zip" in by_hand[0] and str(ckpt) in by_hand[0]
    for line, (name, weight) in zip(by_hand[1:], files.items()):
        assert line.strip() == f"download {weight.url} and save it as {weights / name}"
    assert (not weights.exists() or not any(weights.iterdir())) and not ckpt.exists()


def test_fetch_command_uses_the_config_and_the_folder_the_program_reads(tmp_path, site, monkeypatch, capsys):
    from pcavs_live.cli.main import main
    from pcavs.alignment import LANDMARK_MODEL_FILES, default_landmark_model_dir

    # every file the program loads is pinned to a full SHA-256 in the registry
    assert {name: w.url for name, w in fetch.landmark_files().items()} == LANDMARK_MODEL_FILES
    assert all(len(w.sha256) == 64 for w in fetch.landmark_files().values())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert fetch.default_landmark_dir() == default_landmark_model_dir() == tmp_path / "torch" / "hub" / "checkpoints"

    base, files = site
    monkeypatch.setattr(fetch, "landmark_files", lambda: files)
    monkeypatch.setattr(fetch, "_describe", present)
    code = main(["fetch", "-q", "--checkpoints", str(tmp_path / "ck"), "--set", f"model.checkpoint_url={base}demo.zip"])
    assert code == 0, capsys.readouterr()
    assert present(tmp_path / "ck") == {net: "present" for net in NETS}
    assert fetch.landmark_status(tmp_path / "torch" / "hub" / "checkpoints", files) == {n: "ok" for n in files}


# --------------------------------------------------------------------------- the commands
def test_the_command_comes_first_and_run_is_the_default():
    from pcavs_live.cli.main import split_command
    assert split_command([]) == ("run", [])
    assert split_command(["--out", "x.mp4"]) == ("run", ["--out", "x.mp4"])
    assert split_command(["doctor", "--out", "vcam"]) == ("doctor", ["--out", "vcam"])
    assert split_command(["--port", "1", "doctor"]) == ("run", ["--port", "1", "doctor"])  # not a command there


def test_serve_is_the_studio_and_run_the_default(capsys):
    """`serve` is the multi-session studio (its own options, e.g. --max-sessions); `run` keeps --out."""
    from pcavs_live.cli.main import main
    assert main(["serve", "--max-sessions", "3", "--print-config"]) == 0
    assert "max_sessions = 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the studio takes its outputs from the browsers, not --out
        main(["serve", "--out", "x.mp4", "--print-config"])
    capsys.readouterr()
    assert main(["run", "--out", "x.mp4", "--print-config"]) == 0
    assert 'targets = ["file"]' in capsys.readouterr().out


def test_devices_lists_three_sections(capsys):
    from pcavs_live.cli.main import main
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for title in ("microphones (", "cameras (", "audio outputs:"):
        assert sum(line.startswith(title) for line in out.splitlines()) == 1, out


# --------------------------------------------------------------------------- the wheel in a fresh venv
def _can_build_wheels() -> bool:
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1)
        return True
    except ImportError:
        return importlib.util.find_spec("wheel") is not None


def _copy_source(dest: Path) -> None:
    """What a wheel is built from (a copy, so the build leaves nothing in the working tree)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    for name in WHEEL_TOP_LEVEL:
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels(), reason="setuptools in this environment cannot build wheels offline")
def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_source_tree(tmp_path):
    src, wheels, work = tmp_path / "src", tmp_path / "wheels", tmp_path / "work"
    for d in (src, work):
        d.mkdir()
    _copy_source(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(wheels),
                          "-q"], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("pcavs_live-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"configs/default.toml", "assets/sample/astronaut.png", "assets/sample/speech.wav",
            "stream/web/index.html", "pcavs/networks/generator.py", "pcavs_live/cli/main.py",
            "pcavs_live/common/weights.txt"} <= names
    # Top-level names in site-packages: the specified layout plus one project-named package, nothing generic
    # such as cli/common/pipeline that another distribution could also install.
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == set(WHEEL_TOP_LEVEL), top_level

    # A venv of its own, without pip; the dependencies (torch...) come from this environment's site-packages
    # through a .pth file, which adds that folder only (its own .pth files, e.g. an editable install of
    # this checkout, are not processed).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    site = Path(subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_pcavs_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(pip + ["--python", str(vpy), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PCAVS_LIVE_HOME", "VIRTUAL_ENV")}
    env.update(PCAVS_LIVE_HOME=str(tmp_path / "home"), TORCH_HOME=str(tmp_path / "torch"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "pcavs-live"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)

    where = subprocess.run([vpy, "-c", "import pcavs_live.cli, configs, stream; print(pcavs_live.cli.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).resolve() == (site / "pcavs_live" / "cli" / "__init__.py").resolve()

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: pcavs-live")
    for command in ("run", "serve", "fetch", "devices", "doctor"):
        assert re.search(rf"^  {command} ", helped.stdout, re.M), command

    printed = run("--print-config")
    assert printed.returncode == 0, printed.stderr
    config = tomllib.loads(printed.stdout)
    assert Path(config["identity"]["photo"]) == site / "assets" / "sample" / "astronaut.png"
    assert Path(config["model"]["checkpoint_dir"]) == tmp_path / "home" / "checkpoints" / "demo"
    assert str(REPO_ROOT) not in printed.stdout

    checked = run("doctor", "--port", "0")
    assert checked.returncode == doctor.EXIT_MISSING, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[0] == f"config: {site / 'configs' / 'default.toml'}"
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert set(rows) == {"python", "torch", "checkpoints", "face", "microphone", "virtual", "viewer"}
    assert rows["python"].split()[1] == "ok" and rows["torch"].split()[1] == "ok"
    assert rows["checkpoints"].split()[1] == "missing"
    assert str(tmp_path / "home" / "checkpoints" / "demo") in rows["checkpoints"]
    assert rows["checkpoints"].endswith("fix: pcavs-live fetch")
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in rows["face"]
    assert lines[-1] == "missing for this configuration: checkpoints"
    assert "Traceback" not in checked.stderr
