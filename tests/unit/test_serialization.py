"""JSON in and out: clear errors for what cannot be stored or read back. Never pickle."""

from __future__ import annotations

import datetime

import pytest

from taskmill.errors import PayloadTooLargeError, SerializationError
from taskmill.serialization import decode, decode_payload, encode, encode_payload, try_decode

LIMIT = 1 << 20


def test_arguments_round_trip_as_json() -> None:
    data = encode_payload("shop.charge", (1, "two", [3.5, None]), {"flag": True}, LIMIT)
    assert data == b'[[1,"two",[3.5,null]],{"flag":true}]'
    assert decode_payload(data) == ([1, "two", [3.5, None]], {"flag": True})


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(object(), "object"), (lambda: 1, "function"), (ValueError("x"), "ValueError")],
    ids=["object", "function", "exception"],
)
def test_a_non_serialisable_argument_is_a_clear_error(value: object, type_name: str) -> None:
    with pytest.raises(SerializationError) as info:
        encode_payload("shop.charge", (1, value), {}, LIMIT)
    message = str(info.value)
    assert message.startswith("arguments of task 'shop.charge' cannot be stored as JSON: ")
    assert type_name in message
    assert isinstance(info.value, TypeError)  # what callers passing bad arguments expect


def test_a_non_serialisable_keyword_argument_is_a_clear_error() -> None:
    with pytest.raises(SerializationError, match=r"arguments of task 'mail\.send' cannot be"):
        encode_payload("mail.send", (), {"attachment": open}, LIMIT)


def test_encode_names_what_it_encodes() -> None:
    with pytest.raises(SerializationError, match=r"^result of task 't' cannot be stored as JSON"):
        encode({1, object()}, what="result of task 't'")


def test_values_json_has_no_type_for_are_stored_as_their_json_form() -> None:
    """Documented behaviour: dates travel as ISO strings, tuples and sets as lists."""
    data = encode_payload("t", (datetime.date(2024, 5, 1), (1, 2), {3}), {}, LIMIT)
    assert decode_payload(data) == (["2024-05-01", [1, 2], [3]], {})


def test_a_payload_at_the_limit_is_accepted_and_one_byte_more_is_rejected() -> None:
    overhead = len(encode_payload("t", ("",), {}, LIMIT))
    exact = "x" * (100 - overhead)
    assert len(encode_payload("t", (exact,), {}, 100)) == 100
    with pytest.raises(PayloadTooLargeError) as info:
        encode_payload("t", (exact + "x",), {}, 100)
    assert str(info.value) == (
        "arguments of task 't' are 101 bytes as JSON; the limit is 100 "
        "(App(max_payload_bytes=...)). Store large data elsewhere and pass a reference."
    )
    assert isinstance(info.value, ValueError)


def test_the_size_limit_message_uses_thousands_separators() -> None:
    with pytest.raises(PayloadTooLargeError, match=r"are 2,000,009 bytes as JSON; the limit is"):
        encode_payload("t", ("x" * 2_000_000,), {}, LIMIT)


@pytest.mark.parametrize("data", [b"", b"{not json", b"\xff\xfe", b'[[1], {"a": 1}'])
def test_decoding_invalid_json_is_a_serialisation_error(data: bytes) -> None:
    with pytest.raises(SerializationError, match=r"^stored value is not valid JSON: "):
        decode(data)
    with pytest.raises(SerializationError, match=r"^stored value is not valid JSON: "):
        decode_payload(data)


@pytest.mark.parametrize(
    "data",
    [b"null", b'"args"', b"[]", b"[[]]", b"[[], {}, {}, {}]", b"[{}, []]", b"[[], []]", b"{}"],
)
def test_a_payload_that_is_not_an_args_kwargs_pair_is_rejected(data: bytes) -> None:
    with pytest.raises(SerializationError, match=r"^stored payload is not a JSON \[args, kwargs\]"):
        decode_payload(data)


def test_decode_accepts_text_and_bytes() -> None:
    assert decode('{"a": [1, 2]}') == {"a": [1, 2]}
    assert decode(b"3") == 3


def test_try_decode_shows_unreadable_data_as_text() -> None:
    assert try_decode(b"[1, 2]") == [1, 2]
    assert try_decode(b"\xff{oops") == "\ufffd{oops"
