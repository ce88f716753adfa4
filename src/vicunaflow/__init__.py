"""vicunaflow: build, fine-tune and serve Vicuna from Meta's LLaMA weights."""

from pathlib import Path

__version__ = "0.1.0"

# vicunaflow's own conversation set (ShareGPT layout): the default fine-tuning data and the corpus
# of the tiny tokenizer. Defined here, not in synth, so the workflow finds it without importing torch.
BUILTIN_CONVERSATIONS = Path(__file__).parent / "assets" / "vicuna_conversations.json"


class VicunaflowError(Exception):
    """An error the user can fix: the CLI prints it as one clear message, without a traceback."""


def first_few(items, shown: int = 5) -> str:
    """Items for a message: the first `shown`, joined by commas, then how many more ("a, b, c and 4 more")."""
    items = [str(item) for item in items]
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def require_file(path: str | Path, what: str, expected: str) -> Path:
    """`path` if it is a file; else an error saying whether it is missing or a folder (a folder reported as "no
    such file" sends the user looking for a typo) and what to give instead."""
    path = Path(path)
    if path.is_dir():
        raise VicunaflowError(f"{path} is a folder, not a {what}; give {expected}")
    if not path.is_file():
        raise VicunaflowError(f"{path}: no such {what}; give {expected}")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    """`path` if it is a folder; else an error saying whether it is missing or a file (`model/config.json` given for
    `model`: then the folder holding it is named)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VicunaflowError(f"{path} is a file, not a {what}; give the folder that holds it ({path.parent})")
    if not path.is_dir():
        raise VicunaflowError(f"{path}: no such {what}")
    return path
