"""The one exception hierarchy of the pipeline; library errors are wrapped with context."""

from __future__ import annotations

from collections.abc import Iterable


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """A configuration file is invalid; the message names the file, the line and the problem."""

    def __init__(self, problem: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        self.problem = problem
        self.file = file
        self.line = line
        self.column = column
        where = ""
        if file:
            where = file
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            where += ": "
        super().__init__(f"{where}{problem}")


class UnknownNameError(ConfigError):
    """A registry was asked for a name it does not hold; the message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(self.valid) or '(none)'}")


class SerdeError(PipelineError):
    """A record could not be encoded or decoded; `reason` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class BadRecordError(PipelineError):
    """A decoded record cannot be processed (e.g. no usable identity); it goes to the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class SegmentSyntaxError(ConfigError):
    """A segment query does not parse; the message says where and what was expected."""


class SchemaRegistryUnavailable(PipelineError):
    """The Schema Registry could not be asked for a schema (unreachable, timed out, 5xx): not the record's fault,
    so it is not dead-lettered; ingest holds it and asks again with backoff. `cause` is the error's type."""

    def __init__(self, schema_id: int, cause: str) -> None:
        self.schema_id = schema_id
        self.cause = cause
        super().__init__(f"schema {schema_id}: the Schema Registry is unavailable ({cause})")


class OutputRefused(PipelineError):
    """The producer refused a message (too large for the broker, unknown topic ...): the message that caused
    it is dead-lettered and the worker goes on. `reason` is librdkafka's error name."""

    def __init__(self, topic: str, size: int, reason: str) -> None:
        self.topic = topic
        self.size = size
        self.reason = reason
        super().__init__(f"{topic}: a {size}-byte message was refused ({reason})")


class ProfileOverBudget(PipelineError):
    """A record would take a profile's attributes and identities (what dropping events cannot shrink) over
    the profile's byte budget: the record is dead-lettered and the profile stays as it was."""

    def __init__(self, profile_id: str, size: int, budget: int) -> None:
        self.size = size
        super().__init__(f"profile {profile_id}: the record would make it {size} bytes without its events, "
                         f"over its budget of {budget}")


def where(exc: BaseException) -> str:
    """The frames an error passed through, without its message (a library's message may quote a value):
    what a log may show of an unexpected error."""
    import traceback

    return "".join(traceback.format_tb(exc.__traceback__)) + type(exc).__name__


def describe(exc: BaseException) -> str:
    """What a dead-letter header or log line may say about an error: our own messages (which never carry
    personal data) or, for anything else, only the exception's type (its text may quote a value)."""
    if isinstance(exc, PipelineError):
        return str(exc)[:500]
    return f"{type(exc).__name__} (see the worker log for the traceback)"


class TopicPlanError(PipelineError):
    """`topics apply` found an unsafe change (e.g. shrinking partitions) and refused it."""


class DeliveryError(PipelineError):
    """A destination refused or failed a delivery; `retryable` says whether to try again."""

    def __init__(self, message: str, *, retryable: bool, retry_after_s: float | None = None) -> None:
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        super().__init__(message)


class DefinitionsNotShared(PipelineError):
    """A saved audience definitions file could not be published on `control.audiences` for the other workers."""


class KafkaAuthError(ConfigError):
    """The Kafka cluster refused this client's connection (credentials, TLS trust or protocol): a
    configuration problem, reported at start-up naming the listener, never retried."""


class BrokerError(PipelineError):
    """The local Kafka broker could not be fetched, started or reached."""


class ProcessNotReady(PipelineError):
    """A process this one started (a worker, the destination runner) exited or was not ready by its deadline;
    the message ends with the tail of its log."""
