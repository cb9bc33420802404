"""The project's typed errors, so callers catch what edgewire raises and nothing else."""

from __future__ import annotations


class EdgewireError(Exception):
    """Base of every error edgewire raises on purpose."""


class TopicError(EdgewireError, ValueError):
    """A topic string that is not part of the wire contract (topics.md)."""


class DecodeError(EdgewireError, ValueError):
    """A payload that cannot be turned into a valid envelope: malformed, oversize,
    of another schema version, or failing validation."""


class PayloadTooLarge(DecodeError):
    """A payload above the size limit of its topic; refused before it is parsed."""


class ConfigError(EdgewireError):
    """A configuration file that does not validate; the message names file, line, field and fix."""


class ModelError(EdgewireError):
    """A model artefact that is missing, unreadable, or lacks the metadata edgewire needs."""


class SourceError(EdgewireError):
    """A frame source that cannot be opened or read."""


class TaskStateError(EdgewireError):
    """A task asked to make a transition its state machine does not allow."""


class DiscoveryError(EdgewireError):
    """mDNS advertising or browsing that cannot start; the message says which interface and what to do."""
