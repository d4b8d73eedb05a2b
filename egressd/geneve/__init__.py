"""GENEVE (RFC 8926) codec with egressd's job-identity option."""

from egressd.geneve.codec import (
    DECODE_REASONS,
    GENEVE_PORT,
    HEADER_LEN,
    JOB_OPTION_CLASS,
    JOB_OPTION_LEN,
    JOB_OPTION_TYPE,
    PREFIX_LEN,
    PROTO_IPV4,
    PROTO_IPV6,
    GeneveError,
    GeneveOption,
    GenevePacket,
    JobOption,
    decode,
    encode,
    header_for,
)

__all__ = [
    "DECODE_REASONS",
    "GENEVE_PORT",
    "HEADER_LEN",
    "JOB_OPTION_CLASS",
    "JOB_OPTION_LEN",
    "JOB_OPTION_TYPE",
    "PREFIX_LEN",
    "PROTO_IPV4",
    "PROTO_IPV6",
    "GeneveError",
    "GeneveOption",
    "GenevePacket",
    "JobOption",
    "decode",
    "encode",
    "header_for",
]
