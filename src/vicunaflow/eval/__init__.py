"""Evaluation: MT-bench answers and LLM-judge grading in FastChat's llm_judge formats, held-out loss,
lm-evaluation-harness benchmarks.

    eval download   MT-bench's questions, references and judge prompts (FastChat, pinned, md5-verified)
    eval answers    a model's answers, turn by turn, batched              (eval/answers.py)
    eval judge      single-answer grading by an OpenAI-compatible judge   (eval/judge.py)
    eval loss       loss and perplexity with the training masks           (eval/loss.py)
    eval summary    one table over models, judges and datasets            (eval/summary.py)
    eval harness    lm-evaluation-harness tasks through `vicunaflow serve` (eval/harness.py)

The files are FastChat's, so its own scripts (gen_judgment.py, show_result.py) read ours unchanged;
formats and readers are in eval/mt_bench.py. See docs/eval.md.
"""
