"""The runtime's errors: one small hierarchy, one level of subclasses. Services map them to status codes."""


class EdgeError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(EdgeError):
    """A configuration file or value is wrong; the message names the key and what to change."""


class ArtifactError(EdgeError):
    """An artifact is missing, incomplete, corrupted or does not match this runtime."""


class InvalidRequestError(EdgeError):
    """A request is malformed; the message names the field and what to change."""


class ContextOverflowError(InvalidRequestError):
    """Prompt plus requested tokens exceed the model's context."""


class NotFoundError(EdgeError):
    """A named model, request or KV session does not exist (any more)."""


class UnavailableError(EdgeError):
    """The node cannot take the request now (still loading, draining, or an upstream is down)."""


class ResourceExhaustedError(EdgeError):
    """No KV memory or queue space for the request right now."""
