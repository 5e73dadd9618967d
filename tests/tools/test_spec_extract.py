"""The spec extractor: requirements from .specs prose, and the tests that prove them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.common import TaskError
from tools.spec_extract import extract, parse_spec, yaml_quote

SPEC = """\
# Data plane

## Tasks

- [X-DATA-0001] A task MUST be accepted with 202,
  continued on this line.
- [X-DATA-0002] The server SHOULD answer quickly.

```
- [X-DATA-0003] inside a fence: not a requirement MUST
```

Limits
------

- [X-DATA-0004] A body MAY be large.
"""

TESTS = """\
import pytest

pytestmark = pytest.mark.req("X-DATA-0002")


@pytest.mark.req("X-DATA-0001")
def test_accepted() -> None: ...


class TestLimits:
    @pytest.mark.req("X-DATA-0004")
    def test_large(self) -> None: ...
"""


def tree(tmp_path: Path, spec: str = SPEC, tests: str = TESTS) -> tuple[Path, Path]:
    (tmp_path / ".specs").mkdir()
    (tmp_path / ".specs" / "data.md").write_text(spec, encoding="utf-8")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_data.py").write_text(tests, encoding="utf-8")
    return tmp_path / ".specs", tmp_path / "tests"


def test_requirements_carry_level_section_source_and_their_tests(tmp_path: Path) -> None:
    specs, tests = tree(tmp_path)
    files, requirements = extract(specs, tests)

    by_id = {r.id: r for r in requirements}
    assert sorted(by_id) == ["X-DATA-0001", "X-DATA-0002", "X-DATA-0004"]
    first = by_id["X-DATA-0001"]
    assert first.title == "A task MUST be accepted with 202, continued on this line."
    assert (first.level, first.section, first.source) == ("MUST", "Tasks", ".specs/data.md:5")
    assert by_id["X-DATA-0004"].section == "Limits"
    # A module's pytestmark applies to every test in it, classes included.
    assert by_id["X-DATA-0002"].tests == {
        "tests/test_data.py::test_accepted",
        "tests/test_data.py::TestLimits::test_large",
    }
    assert list(files) == ["data.yaml"]
    assert "  level: MAY\n" in files["data.yaml"]
    assert "    - tests/test_data.py::TestLimits::test_large\n" in files["data.yaml"]


@pytest.mark.parametrize(
    ("spec", "tests", "problem"),
    [
        ("- [x-data-0001] It MUST.\n", "", "malformed requirement ID [x-data-0001]"),
        ("- [X-DATA-0001] nothing to do\n", "", "has no RFC-2119 keyword"),
        ("- [X-DATA-0001] MUST a\n- [X-DATA-0001] MUST b\n", "", "duplicate requirement ID"),
        ("- [X\u2011DATA-0001] MUST a\n", "", "non-ASCII hyphen (U+2011)"),
        (
            "- [X-DATA-0001] MUST a\n",
            'import pytest\n@pytest.mark.req("X-DATA-0009")\ndef test_x() -> None: ...\n',
            "names X-DATA-0009, which no spec defines",
        ),
        (
            "- [X-DATA-0001] MUST a\n",
            'import pytest\n@pytest.mark.req("X-DATA-0001")\ndef check() -> None: ...\n',
            "pytest does not collect it",
        ),
    ],
)
def test_problems_name_the_place(tmp_path: Path, spec: str, tests: str, problem: str) -> None:
    specs, test_dir = tree(tmp_path, spec, tests)
    with pytest.raises(TaskError, match="problem") as raised:
        extract(specs, test_dir)
    assert problem in str(raised.value)


def test_a_spec_outside_the_repository_is_named_by_its_path(tmp_path: Path) -> None:
    path = tmp_path / "x.md"
    path.write_text("- [X-DATA-0001] It MUST work.\n", encoding="utf-8")
    errors: list[str] = []
    [req] = parse_spec(path, errors)
    assert errors == []
    assert req.source == f"{path.as_posix()}:1"


def test_yaml_quoting_escapes_what_yaml_would_fold() -> None:
    assert yaml_quote('say "hi"') == '"say \\"hi\\""'
    assert yaml_quote("a\u2028b") == '"a\\u2028b"'
