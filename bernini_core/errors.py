"""The one exception type for mistakes a user can fix.

Every message names the offending input and says what to do about it, so that a
ComfyUI user, a CLI user and a Python caller all see the same actionable text
instead of a traceback from deep inside torch.
"""


class BerniniError(ValueError):
    """Bad input, a wrong or missing file, or a setting that contradicts another.

    Subclasses ValueError so generic callers (ComfyUI's executor, argparse users)
    treat it as a user error.
    """


def require(condition: bool, message: str) -> None:
    """Raise BerniniError(message) unless condition holds."""
    if not condition:
        raise BerniniError(message)
