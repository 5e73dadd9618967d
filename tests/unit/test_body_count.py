"""The edge's count of the fewest bytes a JSON body can decode to, read part by part."""

from __future__ import annotations

import json

import pytest

from llorch.api.middleware import fewest_decoded_bytes

SAMPLES = [
    "plain text",
    "\x01" * 50,  # \u0001: six bytes for one
    "é and 漢字 and 😀",
    "back\\slash \\u not an escape \\\\u",
    'quotes " and \n newlines \t tabs',
    "😀" * 20,  # surrogate pairs when escaped: twelve bytes for four
]


def counted(body: bytes, size: int) -> int:
    """The count over ``body`` sent in parts of ``size`` bytes."""
    total, last = 0, b""
    for start in range(0, len(body), size):
        part = body[start : start + size]
        total += fewest_decoded_bytes(part, last)
        last = part[-1:]
    return total


@pytest.mark.req("ORCH-SEC-0052")
@pytest.mark.parametrize("content", SAMPLES)
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_count_never_exceeds_what_the_body_decodes_to_however_it_is_split(
    content: str, ensure_ascii: bool
) -> None:
    document = {"kind": "other", "content": content}
    body = json.dumps(document, ensure_ascii=ensure_ascii).encode()
    # What the body stands for: its content's UTF-8 and the rest of the request as sent.
    string = json.dumps(content, ensure_ascii=ensure_ascii).encode()
    decoded = len(body) - len(string) + len(b'""') + len(content.encode("utf-8"))
    for size in (1, 2, 5, 7, len(body)):
        assert counted(body, size) <= decoded, size


@pytest.mark.req("ORCH-SEC-0052")
def test_plain_text_counts_every_byte_and_escapes_count_close_to_what_they_stand_for() -> None:
    assert fewest_decoded_bytes(b'{"content": "' + b"x" * 1000 + b'"}') == 1000 + 15
    escaped = json.dumps("\x01" * 1000).encode()
    assert 1000 <= fewest_decoded_bytes(escaped) <= 1002
