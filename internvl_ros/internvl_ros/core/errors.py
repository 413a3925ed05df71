"""The one exception family of internvl_ros. Messages say what is wrong, where, and what to do."""


class InternVLError(Exception):
    """Base of every error raised by internvl_ros."""


class ModelDirError(InternVLError):
    """The model directory is missing a file, or a file is malformed."""


class ShapeMismatchError(InternVLError):
    """A tensor does not have the shape or dtype the model contract requires."""


class PromptTooLongError(InternVLError):
    """The prompt (with image tokens) does not fit the model's context or prefill limit."""


class ImageDecodeError(InternVLError):
    """An image could not be decoded or converted."""


class BackendError(InternVLError):
    """The inference backend failed or is not available."""


class ConfigError(InternVLError):
    """A configuration value is invalid."""


class BusyError(InternVLError):
    """The pipeline is already running a generation (one at a time per pipeline)."""
