"""Activation: deliver membership and profile changes to HTTP webhooks, Kafka topics and file exports."""

from pipeline.destinations.base import (
    DeadLetterSink,
    Destination,
    DestinationContext,
    DestinationFactory,
    Payload,
    PayloadKind,
    PayloadStatus,
    TopicResolver,
    create_destination,
    destination_kinds,
    register_kind,
)
from pipeline.destinations.config import (
    BatchConfig,
    BreakerConfig,
    ConsentConfig,
    DestinationConfig,
    DestinationsConfig,
    IdentityMapping,
    KindSettings,
    RetryConfig,
    load_destinations,
    parse_destinations,
)
from pipeline.destinations.files import ExportFile, ExportManifest, FileDestination, FileSettings
from pipeline.destinations.http import CircuitBreaker, HttpDestination, HttpSettings, TokenBucket
from pipeline.destinations.kafka_topic import KafkaSettings, KafkaTopicDestination
from pipeline.destinations.lane import Decoder, LogicalTopics, RunnerSettings, json_decoder
from pipeline.destinations.mapping import (
    Skip,
    map_change,
    map_identities,
    map_message,
    map_profile_change,
    transform_identity,
)
from pipeline.destinations.runner import DestinationRunner
from pipeline.destinations.status import DestinationStatus

__all__ = [
    "BatchConfig", "BreakerConfig", "CircuitBreaker", "ConsentConfig", "DeadLetterSink", "Decoder",
    "Destination", "DestinationConfig", "DestinationContext", "DestinationFactory", "DestinationRunner",
    "DestinationStatus", "DestinationsConfig", "ExportFile", "ExportManifest", "FileDestination",
    "FileSettings", "HttpDestination", "HttpSettings", "IdentityMapping", "KafkaSettings", "KindSettings",
    "KafkaTopicDestination", "LogicalTopics", "Payload", "PayloadKind", "PayloadStatus", "RetryConfig",
    "RunnerSettings", "Skip", "TokenBucket", "TopicResolver", "create_destination", "destination_kinds",
    "json_decoder", "load_destinations", "map_change", "map_identities", "map_message",
    "map_profile_change", "parse_destinations", "register_kind", "transform_identity",
]
