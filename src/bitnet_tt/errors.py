"""User-facing errors. Each carries a one-line message; the CLI prints it and exits non-zero."""


class BitNetError(Exception):
    """Base class for errors caused by the user's input (files, options, requests)."""

    exit_code = 2


class ModelNotFoundError(BitNetError):
    """The model folder or hub id cannot be found or downloaded."""


class ConfigError(BitNetError):
    """config.json is missing, malformed, or not a supported BitNet config."""


class CheckpointError(BitNetError):
    """A weights file is missing, corrupt, or holds tensors of the wrong shape or dtype."""


class CapacityError(BitNetError):
    """A request does not fit: prompt longer than the context, no free slot, too many users."""


class RequestError(BitNetError):
    """A generation request has invalid parameters."""


class GenerationError(BitNetError):
    """Generating one request failed (e.g. the model produced non-finite logits); other requests go on."""

    exit_code = 1
