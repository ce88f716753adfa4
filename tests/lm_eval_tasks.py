"""lm-evaluation-harness tasks over local jsonl files, for offline runs against `vicunaflow serve`:
a multiple-choice (loglikelihood) task and a generate_until one (tests/test_logprobs.py, tests/test_harness.py)."""

from __future__ import annotations

import json
from pathlib import Path

MC_ITEMS = [
    {"question": "What do llamas eat?", "choices": ["grass", "stones", "metal"], "answer": 0},
    {"question": "Where do vicunas live?", "choices": ["in the Andes", "under the sea"], "answer": 0},
    {"question": "How many legs has a llama?", "choices": ["four", "two", "six", "none at all"], "answer": 0},
]
GEN_ITEMS = [{"question": "Name a camelid.", "answer": "llama"}, {"question": "Say hello.", "answer": "hello"}]

TASKS = {
    "vf_mc": """
task: vf_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "vf_gen": """
task: vf_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}

# lm-eval (datasets, huggingface_hub) with no network: set before they are imported (a subprocess)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def write_tasks(folder: Path) -> Path:
    """vf_mc.yaml / vf_gen.yaml and their jsonl data in `folder`: an lm-eval --include-path."""
    folder.mkdir(parents=True, exist_ok=True)
    for task, items in (("vf_mc", MC_ITEMS), ("vf_gen", GEN_ITEMS)):
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in items))
        (folder / f"{task}.yaml").write_text(TASKS[task].format(data=data))
    return folder
