"""Imports go downwards only (docs/ARCHITECTURE.md): every module's imports, read with ast (top-level and
inside functions alike, since a lazy import is still an arrow), checked against the layer order

    pcavs_live.common  <-  pcavs  <-  capture, stream  <-  pcavs_live.pipeline  <-  pcavs_live.cluster  <-  pcavs_live.cli  <-  run_live.py

A module may import from its own layer or any layer below it, never above. `capture` and `stream` share
a layer but are independent of each other: the sideways arrows allowed between them are listed in
`SIDEWAYS_ALLOWED`, which is empty (what both need, such as the audio-device listing, lives in
`pcavs_live.common`)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# Lower number = lower layer. The key is the import-path prefix of a layer.
LAYERS: dict[str, int] = {
    "pcavs_live.common": 0,
    "pcavs_live": 0,        # the package's own __init__ (empty by design); its subpackages are listed
    "pcavs": 1,
    "capture": 2,
    "stream": 2,
    "pcavs_live.pipeline": 3,
    "pcavs_live.cluster": 4,   # studio workers placed by Ray, above the sessions they run
    "pcavs_live.cli": 5,
    "run_live": 6,
}
EXACT_ONLY = {"pcavs_live"}    # a new pcavs_live.x must be placed in LAYERS, not inherit layer 0
# (importer's layer key, imported layer key) pairs allowed although both sit on the same level.
SIDEWAYS_ALLOWED: set[tuple[str, str]] = set()
# Arrows that point the wrong way and are being removed: (file, imported module). Empty since the typed
# config moved below the pipeline (pcavs_live.pipeline.options); nothing may be added.
PENDING: set[tuple[str, str]] = set()
CODE_ROOTS = ("pcavs_live", "pcavs", "capture", "stream", "run_live.py")


def layer_of(module: str) -> str | None:
    """The layer key a dotted module name belongs to (the longest matching prefix), None if not ours."""
    best = None
    for key in LAYERS:
        below = module.startswith(key + ".") and key not in EXACT_ONLY
        if (module == key or below) and (best is None or len(key) > len(best)):
            best = key
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def code_files() -> list[Path]:
    files = []
    for root in CODE_ROOTS:
        path = REPO_ROOT / root
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def violations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        importer = layer_of(module_name(path))
        if importer is None:
            continue
        for line, name in imported_modules(path):
            target = layer_of(name)
            if target is None or target == importer:
                continue
            upwards = LAYERS[target] > LAYERS[importer]
            sideways = LAYERS[target] == LAYERS[importer] and (importer, target) not in SIDEWAYS_ALLOWED
            rel = path.relative_to(REPO_ROOT).as_posix()
            if (upwards or sideways) and (rel, name) not in PENDING:
                arrow = "up" if upwards else "sideways"
                found.append(f"{rel}:{line}: {importer} imports {name} ({arrow})")
    return found


def test_layer_table_names_modules_that_exist():
    for key in LAYERS:
        parts = key.split(".")
        base = REPO_ROOT.joinpath(*parts)
        assert base.is_dir() or base.with_suffix(".py").is_file(), key


def test_every_code_module_is_in_a_layer():
    files = code_files()
    assert len(files) > 50
    assert [f for f in files if layer_of(module_name(f)) is None] == []


def test_imports_go_downwards_only():
    assert violations(code_files()) == []


@pytest.mark.parametrize("importer, source, expected", [
    ("stream/x.py", "from capture.audio_sources import AudioDevice\n", "sideways"),
    ("pcavs/x.py", "def f():\n    import stream.vmic\n", "up"),
    ("pcavs_live/common/x.py", "from pcavs.constants import FPS\n", "up"),
    ("pcavs_live/pipeline/x.py", "from pcavs_live.cli.config import Config\n", "up"),
    ("stream/webrtc/x.py", "from ..studio import server\n", None),         # relative, same layer
    ("capture/x.py", "from pcavs_live.common.errors import UserError\nimport numpy\n", None),
    ("pcavs_live/cli/x.py", "from pcavs_live.pipeline import session\nimport capture\n", None),
])
def test_the_checker_sees_each_kind_of_arrow(tmp_path, monkeypatch, importer, source, expected):
    """The checker itself: a planted import in a throw-away tree is reported exactly when it points the
    wrong way (so an empty list above means something)."""
    monkeypatch.setattr(f"{__name__}.REPO_ROOT", tmp_path)
    path = tmp_path / importer
    path.parent.mkdir(parents=True)
    path.write_text(source)
    found = violations([path])
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and f"({expected})" in found[0], found
