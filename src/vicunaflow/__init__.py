"""vicunaflow: build, fine-tune and serve Vicuna from Meta's LLaMA weights."""

__version__ = "0.1.0"


class VicunaflowError(Exception):
    """An error the user can fix: the CLI prints it as one clear message, without a traceback."""
