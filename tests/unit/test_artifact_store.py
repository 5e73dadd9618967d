"""The artifact store: content addressing, atomic bodies, digest checks on read, paging."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator

from llorch.api.views import artifact_body
from llorch.artifacts import Artifact, ArtifactStore
from llorch.clock import FakeClock
from llorch.contracts import openapi
from llorch.errors import (
    ArtifactCorrupt,
    ArtifactNotFound,
    InvalidParams,
    PayloadTooLarge,
    StorageError,
)
from llorch.persistence import Database

MAX_BYTES = 64
StoreFactory = Callable[..., ArtifactStore]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def root(data_dir: Path) -> Path:
    return data_dir / "artifacts-test"


@pytest.fixture
def db(data_dir: Path) -> Iterator[Database]:
    opened = Database.open(data_dir / "llorch-test.sqlite3", profile="test")
    yield opened
    opened.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(db: Database, root: Path, clock: FakeClock) -> ArtifactStore:
    return ArtifactStore(db, root, max_bytes=MAX_BYTES, clock=clock)


def sha256(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def everything(store: ArtifactStore, **filters: Any) -> list[Artifact]:
    page, _ = store.list(
        kind=filters.get("kind"),
        tag=filters.get("tag"),
        task_id=filters.get("task_id"),
        limit=200,
        cursor=None,
    )
    return page


# -- file system access, seen through PEP 578 audit hooks ---------------------------------------

_FILE_EVENTS = {
    "open",
    "os.listdir",
    "os.scandir",
    "os.mkdir",
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.truncate",
    "os.symlink",
    "os.link",
}
_seen: list[list[tuple[str, tuple[Any, ...]]]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _seen and event in _FILE_EVENTS:
        _seen[-1].append((event, args))


@functools.cache
def _install_audit_hook() -> None:
    # An audit hook cannot be removed; it records only inside `file_access()`.
    sys.addaudithook(_audit)


@contextmanager
def file_access() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Every file system event (open, listdir, mkdir, rename, ...) of the block, in order."""
    _install_audit_hook()
    events: list[tuple[str, tuple[Any, ...]]] = []
    _seen.append(events)
    try:
        yield events
    finally:
        _seen.pop()


# -- put and get ----------------------------------------------------------------------------------


@pytest.mark.req("ORCH-CTRL-0020", "ORCH-CTRL-0022")
def test_put_stores_the_content_under_its_sha256_and_get_returns_it(
    store: ArtifactStore, clock: FakeClock
) -> None:
    content = "You are a helpful assistant. ✓"

    artifact, created = store.put(
        kind="prompt", content=content, tags=["system"], metadata={"lang": "en"}, task_id="t-1"
    )

    digest = sha256(content)
    assert created is True
    assert artifact == Artifact(
        id=f"sha256:{digest}",
        digest=digest,
        kind="prompt",
        size_bytes=len(content.encode("utf-8")),
        created_ms=clock.now_ms(),
        tags=("system",),
        parent=None,
        task_id="t-1",
        metadata={"lang": "en"},
    )
    assert artifact.size_bytes == len(content) + 2  # the check mark is three bytes in UTF-8
    assert store.get(artifact.id) == (artifact, content)


@pytest.mark.req("ORCH-CTRL-0020")
def test_artifact_body_is_the_artifact_schema_of_the_control_contract(store: ArtifactStore) -> None:
    parent, _ = store.put(kind="document", content="the parent")
    artifact, _ = store.put(
        kind="trace", content="{}", tags=["a", "b"], parent=parent.id, metadata={"k": "v"}
    )
    components = openapi("control")["components"]

    for one in (parent, artifact):
        body = artifact_body(one)
        OAS30Validator(
            {"$ref": "#/components/schemas/Artifact", "components": components}
        ).validate(body)
        assert set(body) == set(components["schemas"]["Artifact"]["properties"])
    assert artifact_body(artifact)["tags"] == ["a", "b"]
    assert artifact_body(artifact)["metadata"] == {"k": "v"}
    assert artifact_body(artifact)["parent"] == parent.id
    assert artifact_body(parent)["parent"] is None


@pytest.mark.req("ORCH-CTRL-0020", "ORCH-CTRL-0024")
def test_identical_content_is_stored_once_and_answered_with_the_existing_artifact(
    store: ArtifactStore, root: Path, clock: FakeClock
) -> None:
    first, created_first = store.put(kind="prompt", content="same", tags=["one"])
    body = root / first.digest[:2] / first.digest
    before = body.stat()
    clock.advance(1_000)

    again, created_again = store.put(kind="document", content="same", tags=["two"])

    assert (created_first, created_again) == (True, False)
    # The existing artifact, as first stored: kind, tags and time included.
    assert again == first
    assert files_under(root) == [body]
    # The body was not rewritten: same file, untouched.
    after = body.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert everything(store) == [first]


@pytest.mark.req("ORCH-CTRL-0024")
def test_the_body_is_a_file_named_by_its_digest_and_no_temporary_file_remains(
    store: ArtifactStore, root: Path
) -> None:
    artifact, _ = store.put(kind="other", content="line one\nline two\n")

    assert files_under(root) == [root / artifact.digest[:2] / artifact.digest]
    assert (root / artifact.digest[:2] / artifact.digest).read_bytes() == b"line one\nline two\n"


def test_the_store_creates_its_root_directory(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "not" / "there" / "yet"

    store = ArtifactStore(db, root, max_bytes=MAX_BYTES, clock=FakeClock())

    assert root.is_dir()
    artifact, _ = store.put(kind="other", content="x")
    assert store.get(artifact.id)[1] == "x"


@pytest.mark.req("ORCH-CTRL-0024")
def test_a_failed_write_leaves_neither_a_file_nor_a_row(
    store: ArtifactStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)

    with pytest.raises(StorageError, match="No space left") as caught:
        store.put(kind="prompt", content="never stored")

    assert isinstance(caught.value.__cause__, OSError)
    assert files_under(root) == []
    assert everything(store) == []
    with pytest.raises(ArtifactNotFound):
        store.get(f"sha256:{sha256('never stored')}")


@pytest.mark.req("ORCH-CTRL-0020")
def test_a_parent_must_be_a_stored_artifact(store: ArtifactStore, root: Path) -> None:
    parent, _ = store.put(kind="prompt", content="parent")

    child, _ = store.put(kind="transcript", content="child", parent=parent.id)
    assert child.parent == parent.id

    for bad in (f"sha256:{sha256('never stored')}", "parent", f"sha256:{parent.digest.upper()}"):
        with pytest.raises(InvalidParams, match="parent"):
            store.put(kind="transcript", content="orphan", parent=bad)
    assert len(files_under(root)) == 2


@pytest.mark.req("ORCH-CTRL-0021")
@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "image"},
        {"kind": "Prompt"},
        {"content": "half a pair: \ud800"},
        {"tags": ["ok", "\udfff"]},
        {"tags": "a-string"},
        {"metadata": {"k": "\ud83d"}},
        {"tags": ["x\x00y"]},
    ],
    ids=[
        "unknown-kind",
        "kind-case",
        "lone-surrogate",
        "tag-surrogate",
        "tags-str",
        "meta",
        "tag-nul",
    ],
)
def test_invalid_params_are_refused_and_nothing_is_stored(
    store: ArtifactStore, root: Path, changes: dict[str, Any]
) -> None:
    params: dict[str, Any] = {"kind": "prompt", "content": "fine"} | changes

    with pytest.raises(InvalidParams):
        store.put(**params)

    assert files_under(root) == []
    assert everything(store) == []


@pytest.mark.req("ORCH-CTRL-0021")
def test_content_above_max_bytes_in_utf8_is_too_large(store: ArtifactStore, root: Path) -> None:
    # 32 characters, 64 bytes: exactly the limit.
    at_limit = "é" * (MAX_BYTES // 2)
    artifact, _ = store.put(kind="document", content=at_limit)
    assert artifact.size_bytes == MAX_BYTES

    # 33 characters, but 65 bytes: the limit is on the UTF-8 size.
    for too_big in ("é" * (MAX_BYTES // 2) + "x", "x" * (MAX_BYTES + 1)):
        with pytest.raises(PayloadTooLarge) as caught:
            store.put(kind="document", content=too_big)
        assert caught.value.code == "PAYLOAD_TOO_LARGE"
        assert caught.value.retriable is False

    assert files_under(root) == [root / artifact.digest[:2] / artifact.digest]
    assert everything(store) == [artifact]


@pytest.mark.req("ORCH-CTRL-0022")
@pytest.mark.parametrize(
    "artifact_id",
    [
        "sha256:" + "AB" * 32,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "g" * 64,
        "SHA256:" + "a" * 64,
        "md5:" + "a" * 32,
        "a" * 64,
        "../../etc/passwd",
        "sha256:../../../../etc/passwd",
        "sha256:" + "a" * 64 + "/x",
        "sha256:" + "a" * 64 + "\n",
        "sha256:" + "a" * 62 + "/.",
        "",
    ],
)
def test_a_malformed_id_is_invalid_and_never_touches_the_file_system(
    store: ArtifactStore, artifact_id: str
) -> None:
    with file_access() as events, pytest.raises(InvalidParams):
        store.get(artifact_id)

    assert events == []


def test_the_audit_hook_does_see_the_reads_of_get(store: ArtifactStore, root: Path) -> None:
    # The check above is only as good as the hook: a real get must show up in it.
    artifact, _ = store.put(kind="other", content="seen")

    with file_access() as events:
        store.get(artifact.id)

    assert ("open", str(root / artifact.digest[:2] / artifact.digest)) in [
        (event, str(args[0])) for event, args in events
    ]


@pytest.mark.req("ORCH-CTRL-0022")
def test_an_unknown_well_formed_id_is_not_found(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound) as caught:
        store.get(f"sha256:{sha256('never stored')}")

    assert caught.value.code == "ARTIFACT_NOT_FOUND"
    assert caught.value.retriable is False


# -- corruption -----------------------------------------------------------------------------------


@pytest.mark.req("ORCH-CTRL-0025")
@pytest.mark.parametrize(
    "tamper",
    [
        lambda body: body.write_bytes(b"something else entirely"),
        # Same size, one byte changed.
        lambda body: body.write_bytes(b"x" + body.read_bytes()[1:]),
        lambda body: body.write_bytes(b""),
    ],
    ids=["rewritten", "one-byte", "emptied"],
)
def test_a_changed_body_is_corrupt_logged_and_never_served(
    store: ArtifactStore,
    root: Path,
    caplog: pytest.LogCaptureFixture,
    tamper: Callable[[Path], object],
) -> None:
    artifact, _ = store.put(kind="transcript", content="the original transcript")
    body = root / artifact.digest[:2] / artifact.digest
    tamper(body)

    with (
        caplog.at_level(logging.ERROR, logger="llorch.artifacts"),
        pytest.raises(ArtifactCorrupt) as caught,
    ):
        store.get(artifact.id)

    assert caught.value.code == "ARTIFACT_CORRUPT"
    assert caught.value.retriable is False
    assert "the original transcript" not in caught.value.message
    # The client's message names the artifact, not the server's disk.
    assert str(root) not in caught.value.message
    [record] = [r for r in caplog.records if r.name == "llorch.artifacts"]
    assert record.levelno == logging.ERROR
    assert artifact.id in record.getMessage()
    assert str(body) in record.getMessage()


@pytest.mark.req("ORCH-CTRL-0025")
def test_a_missing_body_is_corrupt_and_storing_the_content_again_repairs_it(
    store: ArtifactStore, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    artifact, _ = store.put(kind="prompt", content="lost and found")
    body = root / artifact.digest[:2] / artifact.digest
    body.unlink()

    with caplog.at_level(logging.ERROR, logger="llorch.artifacts"), pytest.raises(ArtifactCorrupt):
        store.get(artifact.id)
    assert any(
        artifact.id in r.getMessage() and str(body) in r.getMessage() for r in caplog.records
    )

    again, created = store.put(kind="prompt", content="lost and found")
    assert (again, created) == (artifact, False)
    assert store.get(artifact.id) == (artifact, "lost and found")


@pytest.mark.req("ORCH-CTRL-0025")
def test_storing_the_content_again_replaces_a_corrupted_body(
    store: ArtifactStore, root: Path
) -> None:
    artifact, _ = store.put(kind="prompt", content="healed")
    body = root / artifact.digest[:2] / artifact.digest
    body.write_bytes(b"garbage")

    store.put(kind="prompt", content="healed")

    assert body.read_bytes() == b"healed"
    assert files_under(root) == [body]
    assert store.get(artifact.id)[1] == "healed"


# -- listing --------------------------------------------------------------------------------------


@pytest.fixture
def five(store: ArtifactStore, clock: FakeClock) -> list[Artifact]:
    """Five artifacts, oldest first, one second apart."""
    made: list[Artifact] = []
    for kind, tags, task_id in (
        ("prompt", ["system"], None),
        ("trace", ["system-x", "t"], "t-1"),
        ("transcript", [], "t-1"),
        ("prompt", ["sys", 'a"b%'], None),
        ("document", ["x", "system"], "t-2"),
    ):
        artifact, _ = store.put(
            kind=kind, content=f"artifact {len(made)}", tags=tags, task_id=task_id
        )
        made.append(artifact)
        clock.advance(1_000)
    return made


@pytest.mark.req("ORCH-CTRL-0023")
def test_list_pages_newest_first_to_the_end(store: ArtifactStore, five: list[Artifact]) -> None:
    seen: list[Artifact] = []
    cursors: list[str | None] = []
    cursor = None
    while True:
        page, cursor = store.list(kind=None, tag=None, task_id=None, limit=2, cursor=cursor)
        seen.extend(page)
        cursors.append(cursor)
        if cursor is None:
            break

    assert seen == five[::-1]
    assert [a.created_ms for a in seen] == sorted((a.created_ms for a in seen), reverse=True)
    assert len(cursors) == 3 and cursors[-1] is None
    assert all(c is not None and c.isdigit() for c in cursors[:-1])


@pytest.mark.req("ORCH-CTRL-0023")
def test_a_page_that_ends_the_list_has_no_next_cursor(
    store: ArtifactStore, five: list[Artifact]
) -> None:
    page, cursor = store.list(kind=None, tag=None, task_id=None, limit=5, cursor=None)
    assert (page, cursor) == (five[::-1], None)

    page, cursor = store.list(kind=None, tag=None, task_id=None, limit=4, cursor=None)
    assert page == five[:0:-1] and cursor is not None
    page, cursor = store.list(kind=None, tag=None, task_id=None, limit=4, cursor=cursor)
    assert (page, cursor) == ([five[0]], None)


@pytest.mark.req("ORCH-CTRL-0023")
def test_list_filters_by_kind_exact_tag_and_task(
    store: ArtifactStore, five: list[Artifact]
) -> None:
    a0, a1, a2, a3, a4 = five

    assert everything(store, kind="prompt") == [a3, a0]
    assert everything(store, kind="other") == []
    # A tag matches one whole tag: not a prefix, not a substring, not a pattern.
    assert everything(store, tag="system") == [a4, a0]
    assert everything(store, tag="sys") == [a3]
    assert everything(store, tag='a"b%') == [a3]
    assert everything(store, tag="%") == []
    assert everything(store, tag="syst") == []
    assert everything(store, task_id="t-1") == [a2, a1]
    assert everything(store, kind="trace", task_id="t-1") == [a1]
    assert everything(store, kind="prompt", tag="system") == [a0]

    page, cursor = store.list(kind=None, tag="system", task_id=None, limit=1, cursor=None)
    assert page == [a4] and cursor is not None
    page, cursor = store.list(kind=None, tag="system", task_id=None, limit=1, cursor=cursor)
    assert (page, cursor) == ([a0], None)


@pytest.mark.req("ORCH-CTRL-0023")
def test_a_cursor_beyond_every_row_starts_from_the_newest(
    store: ArtifactStore, five: list[Artifact]
) -> None:
    # The contract allows 19 digits, more than a SQLite integer holds.
    for huge in ("9999999999999999999", "9223372036854775807"):
        page, _ = store.list(kind=None, tag=None, task_id=None, limit=10, cursor=huge)
        assert page == five[::-1]
    page, cursor = store.list(kind=None, tag=None, task_id=None, limit=10, cursor="0")
    assert page == []
    assert cursor is None


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "abc"},
        {"cursor": "-1"},
        {"cursor": "١٢"},
        {"cursor": "1" * 20},
        {"limit": 0},
        {"kind": "image"},
    ],
)
def test_list_refuses_malformed_parameters(store: ArtifactStore, params: dict[str, Any]) -> None:
    args: dict[str, Any] = {"kind": None, "tag": None, "task_id": None, "limit": 10, "cursor": None}

    with pytest.raises(InvalidParams):
        store.list(**(args | params))


# -- restarts -------------------------------------------------------------------------------------


@pytest.mark.req("ORCH-CTRL-0024")
def test_the_store_survives_reopening_the_database(
    db: Database, data_dir: Path, root: Path, clock: FakeClock
) -> None:
    store = ArtifactStore(db, root, max_bytes=MAX_BYTES, clock=clock)
    parent, _ = store.put(kind="prompt", content="before the restart", tags=["kept"])
    child, _ = store.put(
        kind="trace", content="{}", parent=parent.id, metadata={"engine": "mock"}, task_id="t-9"
    )
    db.close()

    reopened = Database.open(data_dir / "llorch-test.sqlite3", profile="test")
    try:
        again = ArtifactStore(reopened, root, max_bytes=MAX_BYTES, clock=FakeClock())
        assert again.get(parent.id) == (parent, "before the restart")
        assert again.get(child.id) == (child, "{}")
        assert everything(again, tag="kept") == [parent]
        assert again.put(kind="prompt", content="before the restart") == (parent, False)
    finally:
        reopened.close()
