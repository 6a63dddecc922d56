"""The docs stay true to the code: every path and public name docs/ARCHITECTURE.md writes in backticks
exists, and README's option table lists every long option the command line has.

What the architecture check reads (inline `code` spans only; fenced blocks are diagrams):
  a path      `pcavs_live/pipeline/timeline.py`, `stream/web/`, `run_live.py`   → that file or folder exists
  a module    `pcavs.engine`, `pcavs_live.common.errors.UserError`               → found by the files that define it
  a name      `Avatar`, `FPS`, `Avatar.render`, `AudioChunk.start_sample` → a class / function / constant
              defined (or re-exported) at the top level of some project module; after a dot, a member
              of that class (its methods, class attributes, dataclass fields, `self.x` assignments,
              inherited from project base classes)
A span that is a call or a signature is checked by the name before its "(". Anything else is a plain
word and is not checked: lower-case single words (`forward`), names rooted outside the project
(`torch.load`, `config.server.port`), spans with spaces or operators.

Resolution is by reading the project's source files (ast), not by importing them: fast, no side effects,
and a module split into a package that re-exports its names still resolves.
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO_ROOT

ARCHITECTURE = REPO_ROOT / "docs" / "ARCHITECTURE.md"
README = REPO_ROOT / "README.md"
NOT_PROJECT_NAMES = {"None", "True", "False"}  # capitalised words in backticks that are Python's, not ours

_FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)
_SPAN = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"(?:[\w.-]+/)+[\w.-]*|[\w-]+\.(?:py|toml|md|txt|sh|json|ini|js|css|html)")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_CAPITALISED = re.compile(r"[A-Z]\w*")
_CALL = re.compile(r"([A-Za-z_][\w.]*)\(")


# --------------------------------------------------------------------------- an index of the project's names
@dataclass
class ProjectIndex:
    """Top-level names per module and members per class name, read from the source files."""

    root: Path
    modules: dict[str, set[str]] = field(default_factory=dict)          # "pcavs.engine" → {"Avatar", ...}
    classes: dict[str, list[tuple[set[str], list[str]]]] = field(default_factory=lambda: defaultdict(list))
    toplevel: set[str] = field(default_factory=set)                     # every top-level name anywhere

    @classmethod
    def build(cls, root: Path) -> "ProjectIndex":
        index = cls(root)
        for package in sorted(p.parent for p in root.glob("*/__init__.py")):
            for path in sorted(package.rglob("*.py")):
                index._add(path)
        for path in sorted(root.glob("*.py")):
            index._add(path)
        return index

    def _add(self, path: Path) -> None:
        rel = path.relative_to(self.root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _top_statements(tree.body):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                self.classes[node.name].append((_members(node), [_base_name(b) for b in node.bases]))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        self.modules[".".join(parts)] = names
        self.toplevel |= names

    def class_has(self, name: str, member: str, seen: frozenset[str] = frozenset()) -> bool:
        if name in seen:
            return False
        for members, bases in self.classes.get(name, []):
            if member in members or any(self.class_has(b, member, seen | {name}) for b in bases):
                return True
        return False

    def resolves(self, dotted: str) -> bool | None:
        """True/False for a project name; None when the name is not rooted in the project (not checked)."""
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            module = ".".join(parts[:cut])
            if module in self.modules:
                return self._attributes(self.modules[module], parts[cut:])
        if parts[0] in self.modules or any(m.split(".")[0] == parts[0] for m in self.modules):
            return False  # rooted in a project package, but no such module
        if _CAPITALISED.fullmatch(parts[0]):
            if parts[0] in NOT_PROJECT_NAMES:
                return None
            return self._attributes(self.toplevel, parts)
        return None

    def _attributes(self, names: set[str], rest: list[str]) -> bool:
        if not rest:
            return True
        if rest[0] not in names:
            return False
        if len(rest) == 1:
            return True
        return len(rest) == 2 and self.class_has(rest[0], rest[1])


def _top_statements(body: list[ast.stmt]):
    """Top-level statements, looking inside `if`/`try` blocks (optional imports, TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _top_statements(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_statements(node.body + node.orelse + node.finalbody
                                       + [s for h in node.handlers for s in h.body])
        else:
            yield node


def _members(node: ast.ClassDef) -> set[str]:
    members: set[str] = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(item.name)
        elif isinstance(item, ast.Assign):
            members.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members.add(item.target.id)
    for sub in ast.walk(node):  # self.x = ... in any method
        if isinstance(sub, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
            for t in targets:
                for a in ast.walk(t):
                    if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id == "self":
                        members.add(a.attr)
    return members


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _base_name(node.value)
    return node.id if isinstance(node, ast.Name) else ""


# --------------------------------------------------------------------------- the checker
def code_spans(markdown: str) -> list[str]:
    return _SPAN.findall(_FENCE.sub("", markdown))


def missing_names(markdown: str, index: ProjectIndex) -> list[str]:
    """Every backticked path or project name in `markdown` that does not exist (in order, no repeats)."""
    missing: list[str] = []
    for span in code_spans(markdown):
        span = span.strip()
        call = _CALL.match(span)
        token = call.group(1) if call else span
        if _PATH.fullmatch(token) and not token.startswith(("/", "..")):
            ok: bool | None = (index.root / token).exists()
        elif _DOTTED.fullmatch(token):
            ok = index.resolves(token)
        elif _CAPITALISED.fullmatch(token) and token not in NOT_PROJECT_NAMES:
            ok = token in index.toplevel
        else:
            ok = None
        if ok is False and token not in missing:
            missing.append(token)
    return missing


_INDEX: ProjectIndex | None = None


def project_index() -> ProjectIndex:
    global _INDEX
    if _INDEX is None:
        _INDEX = ProjectIndex.build(REPO_ROOT)
    return _INDEX


# --------------------------------------------------------------------------- tests
def test_architecture_doc_names_only_things_that_exist():
    missing = missing_names(ARCHITECTURE.read_text(encoding="utf-8"), project_index())
    assert not missing, "docs/ARCHITECTURE.md names things the code does not have: " + ", ".join(missing)


def test_architecture_doc_covers_every_package_and_pipeline_module():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    spans = set(code_spans(text))
    for package in ("pcavs_live/common/", "pcavs/", "capture/", "pcavs_live/pipeline/", "stream/", "pcavs_live/cli/", "bench/"):
        assert f"## {package}" in text or package in spans, package
    for module in ("pcavs_live.pipeline.session", "pcavs_live.pipeline.timeline", "pcavs_live.pipeline.metrics", "pcavs_live.pipeline.scheduler",
                   "pcavs_live.common.errors", "pcavs.constants", "stream.webrtc", "pcavs.alignment", "run_live.py"):
        assert module in spans, module


def test_checker_reports_stale_names_and_ignores_plain_words():
    doc = """
    * `Avatar.from_photo(...)`: identity once; `Avatar.step(mel_window, pose_input|None)`; `MelSpec` front end.
    * `pcavs/nothing.py`, `pcavs.nothing.Thing`, `pcavs.engine.NoSuchThing`, `stream/nowhere/`, `NoSuchClass.x`.
    * Real: `Avatar`, `Avatar.render`, `pcavs.engine.Avatar.render`, `pcavs_live/pipeline/timeline.py`, `stream/web/`,
      `pcavs_live.common.errors.UserError`, `FPS`, `AudioChunk.start_sample`, `IdentityEncoder(nn.Module)`, `run_live.py`,
      `WebRTCServer.start`, `Config`, `Session.run`.
    * Plain: `forward(img) -> (B,512)`, `torch.load(weights_only=True)`, `config.server.port`, `model.*`,
      `None`, `--out`, `"sample"`, `(B,3,224,224)`, `RGB uint8 HxWx3`, `noise`.
    ```
    `Ignored.in_a_fence`
    ```
    """
    assert missing_names(doc, project_index()) == [
        "Avatar.from_photo", "Avatar.step", "MelSpec", "pcavs/nothing.py", "pcavs.nothing.Thing",
        "pcavs.engine.NoSuchThing", "stream/nowhere/", "NoSuchClass.x"]


def _readme_option_table_first_column() -> str:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| option | meaning |")
    cells = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells.append(re.split(r"(?<!\\)\|", line)[1])
    return "\n".join(cells)


def test_readme_option_table_lists_every_long_option():
    from run_live import build_parser
    flags = {s for action in build_parser()._actions for s in action.option_strings
             if s.startswith("--") and s != "--help"}
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", _readme_option_table_first_column()))
    assert not flags - listed, f"README's option table lacks {sorted(flags - listed)}"
    assert not listed - flags, f"README's option table lists options that do not exist: {sorted(listed - flags)}"
    assert {"--vcam-device", "--max-seconds"} <= listed
