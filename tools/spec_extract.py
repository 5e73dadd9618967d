"""``xtask.py spec-extract [--check]``: .specs/*.md -> requirements/*.yaml.

Each requirement is a list item starting with a bracketed ID and holding an RFC-2119 keyword;
the tests that prove it carry ``@pytest.mark.req("ID")`` (read from the source, not by running
pytest). ``--check`` fails when requirements/ is stale or a MUST requirement has no test.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.common import ROOT, TaskError, UsageError, main, note, step
from tools.common import rel as _rel

SPECS_DIR = ROOT / ".specs"
REQUIREMENTS_DIR = ROOT / "requirements"
TESTS_DIR = ROOT / "tests"

ID_RE = r"[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)*-[0-9]{4}"
# U+2010..U+2015 (hyphen .. horizontal bar), U+2212 (minus), U+00AD (soft hyphen),
# U+FE63 (small hyphen-minus), U+FF0D (fullwidth hyphen-minus).
BAD_HYPHENS = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u00ad\ufe63\uff0d"
_ANY_HYPHEN = "[-" + BAD_HYPHENS + "]"
ID_LIKE_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Z][A-Z0-9]*(?:"
    + _ANY_HYPHEN
    + r"[A-Z0-9]+)*"
    + _ANY_HYPHEN
    + r"[0-9]{4}(?![0-9])"
)
# A list item whose text starts with a bracketed ID that is not a link ("[X-0001](...)").
REQ_LINE_RE = re.compile(
    r"^(?P<indent>\s*)[-*+]\s+\[(?P<id>" + ID_RE + r")\](?![(\[])(?P<text>.*)$"
)
# Looks like a requirement but the ID is malformed (lowercase, not four digits, ...).
NEAR_REQ_LINE_RE = re.compile(
    r"^\s*[-*+]\s+\[(?P<id>[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*-[0-9]{3,5})\](?![(\[])"
)
ATX_HEADING_RE = re.compile(r"^ {0,3}#{1,6}(?:\s+(?P<text>.*?))?(?:\s+#+)?\s*$")
LIST_ITEM_RE = re.compile(r"^([-*+]|[0-9]+[.)])(\s|$)")
SETEXT_RE = re.compile(r"^ {0,3}(=+|-+)\s*$")
FENCE_RE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})")
KEYWORD_RE = re.compile(r"(?<![A-Za-z0-9_])(MUST|SHALL|SHOULD|MAY)(?![A-Za-z0-9_])")
LEVELS = {"MUST": "MUST", "SHALL": "MUST", "SHOULD": "SHOULD", "MAY": "MAY"}
LEVEL_ORDER = ("MUST", "SHOULD", "MAY")


@dataclass
class Requirement:
    id: str
    title: str
    level: str
    section: str
    spec: str  # path relative to the repository root, e.g. ".specs/data-plane.md"
    line: int
    tests: set[str] = field(default_factory=set)

    @property
    def source(self) -> str:
        return f"{self.spec}:{self.line}"


def _hyphen_errors(spec: str, lines: list[str]) -> list[str]:
    """IDs written with a hyphen that only looks like '-'."""
    errors = []
    for number, line in enumerate(lines, start=1):
        for match in ID_LIKE_RE.finditer(line):
            token = match.group(0)
            bad = sorted({f"U+{ord(ch):04X}" for ch in token if ch in BAD_HYPHENS})
            if bad:
                clean = "".join("-" if ch in BAD_HYPHENS else ch for ch in token)
                errors.append(
                    f"{spec}:{number}: {clean!r} is written with a non-ASCII hyphen "
                    f"({', '.join(bad)}); use '-' (U+002D)"
                )
    return errors


def _continuation(lines: list[str], index: int, indent: int) -> tuple[list[str], int]:
    """The continuation lines from ``index`` (non-blank, indented deeper than the bullet, not a
    new requirement or fence), and the index after them."""
    parts = []
    while index < len(lines):
        follow = lines[index]
        if not follow.strip() or REQ_LINE_RE.match(follow) or FENCE_RE.match(follow):
            break
        follow = follow.expandtabs(4)
        if len(follow) - len(follow.lstrip()) <= indent:
            break
        parts.append(follow)
        index += 1
    return parts, index


def _closes(fence: str, fence_match: re.Match[str] | None) -> bool:
    if fence_match is None:
        return False
    marker = fence_match.group("fence")
    return marker[0] == fence[0] and len(marker) >= len(fence)


def _not_a_requirement(spec: str, number: int, line: str, errors: list[str]) -> bool:
    """Report a malformed ID on a plain line; whether the line may precede a setext underline
    (an unindented paragraph line, not a list item)."""
    near = NEAR_REQ_LINE_RE.match(line)
    if near:
        errors.append(
            f"{spec}:{number}: malformed requirement ID [{near.group('id')}] "
            f"(expected the pattern {ID_RE})"
        )
    return bool(line.strip()) and not line[0].isspace() and not LIST_ITEM_RE.match(line)


def _requirement(
    where: tuple[str, int], req: re.Match[str], title: str, section: str, errors: list[str]
) -> Requirement | None:
    spec, number = where
    keyword = KEYWORD_RE.search(title)
    if keyword is None:
        errors.append(
            f"{spec}:{number}: requirement {req.group('id')} has no RFC-2119 keyword "
            "(MUST, MUST NOT, SHALL, SHOULD, SHOULD NOT or MAY, in capitals)"
        )
        return None
    level = LEVELS[keyword.group(1)]
    return Requirement(req.group("id"), title, level, section, spec, number)


def parse_spec(path: Path, errors: list[str], root: Path = ROOT) -> list[Requirement]:
    """Return the requirements of one spec file; append problems to `errors`."""
    spec = _rel(path, root)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        errors.append(f"{spec}: not valid UTF-8 ({exc})")
        return []
    errors.extend(_hyphen_errors(spec, lines))
    requirements: list[Requirement] = []
    section = ""
    fence: str | None = None
    previous_text_line = False  # for setext headings
    index = 0
    while index < len(lines):
        line = lines[index]
        number = index + 1
        index += 1
        fence_match = FENCE_RE.match(line)
        if fence is not None:
            fence = None if _closes(fence, fence_match) else fence
            continue
        heading = ATX_HEADING_RE.match(line)
        setext = previous_text_line and SETEXT_RE.match(line)
        req = REQ_LINE_RE.match(line)
        previous_text_line = False
        if fence_match:
            fence = fence_match.group("fence")
        elif heading:
            section = " ".join((heading.group("text") or "").split())
        elif setext:
            section = " ".join(lines[index - 2].split())
        elif req is None:
            previous_text_line = _not_a_requirement(spec, number, line, errors)
        else:
            parts, index = _continuation(lines, index, len(req.group("indent").expandtabs(4)))
            title = " ".join(" ".join([req.group("text"), *parts]).split())
            found = _requirement((spec, number), req, title, section, errors)
            if found is not None:
                requirements.append(found)
    return requirements


def _mark_req_call(node: ast.expr) -> ast.Call | None:
    """`pytest.mark.req(...)` or `mark.req(...)`, else None."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "req"):
        return None
    owner = func.value
    if isinstance(owner, ast.Attribute) and owner.attr == "mark":
        return node if isinstance(owner.value, ast.Name) and owner.value.id == "pytest" else None
    if isinstance(owner, ast.Name) and owner.id == "mark":
        return node
    return None


def _req_ids(nodes: Sequence[ast.expr], where: str, errors: list[str]) -> list[tuple[str, int]]:
    """The (ID, line) pairs named by req markers among `nodes`."""
    found: list[tuple[str, int]] = []
    for node in nodes:
        call = _mark_req_call(node)
        if call is None:
            continue
        if call.keywords:
            errors.append(f"{where}:{call.lineno}: pytest.mark.req takes IDs only, no keywords")
        if not call.args:
            errors.append(f"{where}:{call.lineno}: pytest.mark.req names no requirement ID")
        for arg in call.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((arg.value, arg.lineno))
            else:
                errors.append(
                    f"{where}:{arg.lineno}: pytest.mark.req arguments must be string literals "
                    "(spec-extract reads them without running pytest)"
                )
    return found


def _pytestmark(body: Sequence[ast.stmt]) -> list[ast.expr]:
    """The marker expressions assigned to `pytestmark` in a module or class body."""
    marks: list[ast.expr] = []
    for stmt in body:
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign):
            targets = [stmt.target]
        else:
            continue
        value = stmt.value
        if value is None or not any(
            isinstance(target, ast.Name) and target.id == "pytestmark" for target in targets
        ):
            continue
        marks.extend(value.elts if isinstance(value, ast.List | ast.Tuple) else [value])
    return marks


def _collect_tests(
    body: Sequence[ast.stmt],
    prefix: str,
    inherited: list[tuple[str, int]],
    where: str,
    out: dict[str, set[str]],
    errors: list[str],
) -> None:
    """Record which test node IDs prove which requirement IDs, following pytest's collection."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            own = _req_ids(stmt.decorator_list, where, errors)
            if not stmt.name.startswith("test"):
                if own:
                    errors.append(
                        f"{where}:{stmt.lineno}: {stmt.name} carries pytest.mark.req but pytest "
                        "does not collect it as a test (name it test_*)"
                    )
                continue
            for req_id, _line in [*inherited, *own]:
                out.setdefault(req_id, set()).add(f"{prefix}::{stmt.name}")
        elif isinstance(stmt, ast.ClassDef):
            own = _req_ids(stmt.decorator_list, where, errors)
            own += _req_ids(_pytestmark(stmt.body), where, errors)
            if not stmt.name.startswith("Test"):
                if own:
                    errors.append(
                        f"{where}:{stmt.lineno}: class {stmt.name} carries pytest.mark.req but "
                        "pytest does not collect it (name it Test*)"
                    )
                continue
            _collect_tests(
                stmt.body, f"{prefix}::{stmt.name}", [*inherited, *own], where, out, errors
            )


def scan_tests(
    errors: list[str], tests_dir: Path = TESTS_DIR
) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Map requirement ID -> test node IDs, and ID -> where markers name it (for errors)."""
    proofs: dict[str, set[str]] = {}
    mentions: dict[str, list[str]] = {}
    if not tests_dir.is_dir():
        return proofs, mentions
    for path in sorted(tests_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        where = _rel(path, tests_dir.parent)
        try:
            tree = ast.parse(path.read_bytes(), filename=where)
        except SyntaxError as exc:
            errors.append(f"{where}:{exc.lineno}: cannot parse: {exc.msg}")
            continue
        module_marks = _req_ids(_pytestmark(tree.body), where, errors)
        found: dict[str, set[str]] = {}
        _collect_tests(tree.body, where, module_marks, where, found, errors)
        for req_id, tests in found.items():
            proofs.setdefault(req_id, set()).update(tests)
        # Every marker, collected or not, must name a known ID: remember where each appears.
        for node in ast.walk(tree):
            if isinstance(node, ast.expr) and _mark_req_call(node) is not None:
                for req_id, line in _req_ids([node], where, []):
                    mentions.setdefault(req_id, []).append(f"{where}:{line}")
    return proofs, mentions


_PLAIN_SAFE_RE = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./:\-]*$")
# Characters YAML does not allow raw in a double-quoted scalar, or would fold as line breaks.
_YAML_UNSAFE = {0x7F, 0x85, 0x2028, 0x2029, 0xFEFF}


def yaml_quote(text: str) -> str:
    """A YAML double-quoted scalar, escaped JSON-style."""
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(
        f"\\u{ord(ch):04x}"
        if ord(ch) in _YAML_UNSAFE
        or 0x80 <= ord(ch) <= 0x9F
        or 0xD800 <= ord(ch) <= 0xDFFF
        or ord(ch) in (0xFFFE, 0xFFFF)
        else ch
        for ch in quoted
    )


def yaml_plain_or_quoted(text: str) -> str:
    if _PLAIN_SAFE_RE.match(text) and ": " not in text and not text.endswith(":"):
        return text
    return yaml_quote(text)


def render_requirements(spec: str, requirements: list[Requirement]) -> str:
    out = [f"# Generated by `python3 xtask.py spec-extract` from {spec}. Do not edit."]
    if not requirements:
        out.append("{}")
    for req in sorted(requirements, key=lambda r: r.id):
        out.append(f"{req.id}:")
        out.append(f"  title: {yaml_quote(req.title)}")
        out.append(f"  level: {req.level}")
        out.append(f"  section: {yaml_quote(req.section)}")
        out.append(f"  source: {yaml_plain_or_quoted(req.source)}")
        if req.tests:
            out.append("  tests:")
            out.extend(f"    - {yaml_plain_or_quoted(test)}" for test in sorted(req.tests))
        else:
            out.append("  tests: []")
    return "\n".join(out) + "\n"


def _error_order(error: str) -> tuple[str, int, str]:
    match = re.match(r"^([^:]*)(?::(\d+))?:", error)
    if match is None:
        return ("", 0, error)
    return (match.group(1), int(match.group(2) or 0), error)


def extract(
    specs_dir: Path = SPECS_DIR, tests_dir: Path = TESTS_DIR
) -> tuple[dict[str, str], list[Requirement]]:
    """Build requirements/*.yaml in memory: (file name -> text, all requirements)."""
    errors: list[str] = []
    root = specs_dir.parent
    specs = sorted(specs_dir.glob("*.md")) if specs_dir.is_dir() else []
    if not specs:
        raise TaskError(f"no spec files: {_rel(specs_dir)}/*.md matches nothing")
    by_spec: dict[str, tuple[str, list[Requirement]]] = {}
    by_id: dict[str, Requirement] = {}
    stems: dict[str, str] = {}
    for path in specs:
        name = f"{path.stem}.yaml"
        if name.lower() in stems:
            errors.append(
                f"{_rel(path, root)}: its output {name} clashes with {stems[name.lower()]}"
            )
        stems[name.lower()] = _rel(path, root)
        by_spec[name] = (_rel(path, root), [])
        for req in parse_spec(path, errors, root):
            first = by_id.get(req.id)
            if first is not None:
                errors.append(
                    f"{req.source}: duplicate requirement ID {req.id} (first at {first.source})"
                )
                continue
            by_id[req.id] = req
            by_spec[name][1].append(req)
    proofs, mentions = scan_tests(errors, tests_dir)
    for req_id in sorted(mentions):
        if req_id not in by_id:
            for place in mentions[req_id]:
                errors.append(f"{place}: pytest.mark.req names {req_id}, which no spec defines")
    if errors:
        errors.sort(key=_error_order)
        raise TaskError(f"found {len(errors)} problem(s):\n" + "\n".join(f"  {e}" for e in errors))
    for req_id, tests in proofs.items():
        by_id[req_id].tests.update(tests)
    files = {name: render_requirements(spec, reqs) for name, (spec, reqs) in by_spec.items()}
    return files, sorted(by_id.values(), key=lambda r: r.id)


def _existing_outputs() -> dict[str, bytes]:
    if not REQUIREMENTS_DIR.is_dir():
        return {}
    return {path.name: path.read_bytes() for path in sorted(REQUIREMENTS_DIR.glob("*.yaml"))}


def cmd_spec_extract(args: list[str]) -> int:
    if args not in ([], ["--check"]):
        raise UsageError("spec-extract takes no argument but --check")
    check = args == ["--check"]
    step("spec-extract" + (" --check" if check else ""))
    files, requirements = extract()
    existing = _existing_outputs()
    counts = {level: sum(r.level == level for r in requirements) for level in LEVEL_ORDER}
    untested = {
        level: [r for r in requirements if r.level == level and not r.tests]
        for level in LEVEL_ORDER
    }
    print(
        f"{len(requirements)} requirements in {len(files)} spec file(s): "
        + ", ".join(f"{counts[level]} {level}" for level in LEVEL_ORDER)
        + "; without a test: "
        + ", ".join(f"{len(untested[level])} {level}" for level in LEVEL_ORDER)
    )
    if not check:
        REQUIREMENTS_DIR.mkdir(exist_ok=True)
        for name, text in files.items():
            if existing.get(name) != text.encode("utf-8"):
                (REQUIREMENTS_DIR / name).write_bytes(text.encode("utf-8"))
                print(f"  wrote requirements/{name}")
        for name in sorted(set(existing) - set(files)):
            (REQUIREMENTS_DIR / name).unlink()
            print(f"  removed stale requirements/{name}")
        return 0

    ok = True
    stale = [
        f"  requirements/{name}: "
        + ("missing" if name not in existing else "differs" if name in files else "extra")
        for name in sorted(set(files) | set(existing))
        if existing.get(name) != (files[name].encode("utf-8") if name in files else None)
    ]
    if stale:
        ok = False
        print("\n".join(stale))
        note("requirements/ is stale: run python3 xtask.py spec-extract")
    if untested["MUST"]:
        ok = False
        print(f"{len(untested['MUST'])} MUST requirement(s) have no test:")
        for req in untested["MUST"]:
            print(f"  {req.id}  {req.source}  {req.title}")
        note("every MUST requirement needs a test marked @pytest.mark.req(ID)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main("spec-extract", cmd_spec_extract))
