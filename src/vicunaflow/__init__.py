"""vicunaflow: build, fine-tune and serve Vicuna from Meta's LLaMA weights."""

from pathlib import Path

__version__ = "0.1.0"

# vicunaflow's own conversation set (ShareGPT layout): the default fine-tuning data and the corpus
# of the tiny tokenizer. Defined here, not in synth, so the workflow finds it without importing torch.
BUILTIN_CONVERSATIONS = Path(__file__).parent / "assets" / "vicuna_conversations.json"


class VicunaflowError(Exception):
    """An error the user can fix: the CLI prints it as one clear message, without a traceback."""
