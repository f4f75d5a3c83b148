"""What logs and dead-letter headers may say about an error: never the text of a library's exception."""

from __future__ import annotations

from pipeline.errors import OutputRefused, describe, where


def _raise_with_a_value(value: str) -> None:
    {"x": 1}[value]  # source lines are shown, data is not


def test_an_unexpected_error_is_described_by_its_type_and_frames_never_its_message() -> None:
    # Given a library error whose message quotes a personal value
    try:
        _raise_with_a_value("ana" + "@example.com")
    except KeyError as exc:
        # When it is described for a header and for a log line
        header, log_text = describe(exc), where(exc)
    # Then both name what happened and where, and neither carries the value
    assert header == "KeyError (see the worker log for the traceback)"
    assert "_raise_with_a_value" in log_text and log_text.endswith("KeyError")
    assert "ana@example.com" not in header + log_text
    # And our own errors, which never carry values, are given whole
    assert describe(OutputRefused("cdp.t", 2_000_000, "MSG_SIZE_TOO_LARGE")) == (
        "cdp.t: a 2000000-byte message was refused (MSG_SIZE_TOO_LARGE)")
