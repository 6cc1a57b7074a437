"""Engine errors that the HTTP side may need to recognise (no torch import here)."""


class ModelLoadError(Exception):
    """The model directory cannot be served; the message is one line for the user."""
