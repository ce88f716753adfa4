"""`data clean` + `data split` against FastChat 0.2.36's clean_sharegpt.py + split_long_conversation.py,
on one synthetic ShareGPT-style HTML dump, side by side in one run; what each keeps, compared.

    python bench/bench_data.py                      # 90,000 conversations (~1 GB), the issue's size
    python bench/bench_data.py --n 5000             # a quick run (~55 MB)
    python bench/bench_data.py --n 5000 --only ours
    python bench/bench_data.py --n 20000 --only ours --before 0b00ce8 --repeat 2   # before/after, one run

The input mimics ShareGPT's HTML dumps (sg_90k_part*_html.json): a JSON array (indent 2), user
turns in plain text, assistant turns in ChatGPT's HTML (prose paragraphs, lists, tables, code blocks
with the "python [Copy code]" bar and highlight.js spans), 1 to 20 exchanges; a Zipf vocabulary of
syllable-built words, so a 32,000-piece SentencePiece BPE (trained here on a sample, LLaMA's kind)
splits it about as LLaMA splits English. Planted faults, by share of conversations: 2% exact
duplicates (new id), 1% an empty reply mid-way, 1% opening with the assistant, 1% two user turns in a
row, 1% a `bing`/`bard` role, 0.5% a `tool` turn, 3% German or Chinese.

Each side runs as child processes; wall time and the peak RSS of the process tree (psutil, every
50 ms) are recorded. FastChat's split gets the same fast tokenizer object (its `use_fast=False` is not
what is measured here: the algorithm is). Checks on each side's final output: pieces over the limit
(exact length, Vicuna v1.1 prompt as `data tokenize` counts it), pieces that do not start with a
user turn or end with a reply, replies (assistant turns) kept versus the cleaned input.
`--before REV` also runs our clean + split from that commit's src/ (git archive), alternating with
the working tree's, `--repeat` times each; medians are recorded, and whether both gave the same bytes.
Results: bench/results/data_<n>.json; the table goes to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

GERMAN = [
    "Ich habe eine Frage zu meinem Programm, das nicht richtig funktioniert.",
    "Kannst du mir bitte erklären, wie man eine Liste in Python sortiert?",
    "Warum ist der Himmel blau und nicht grün oder rot?",
    "Schreibe mir bitte einen kurzen Brief an meinen Vermieter wegen der Heizung.",
]
CHINESE = [
    "请问如何在Python中对列表进行排序？",
    "我的程序运行时出现了错误，你能帮我看看吗？",
    "为什么天空是蓝色的？请详细解释一下。",
    "请帮我写一封给房东的信，关于暖气的问题。",
]
CODE = [
    "def {f}(items):\n    result = []\n    for item in items:\n        if item.{a} > 0:\n            result.append(item)\n    return result\n",
    "import numpy as np\n\nx = np.arange({n})\ny = x ** 2\nprint(y.sum())\n",
    "class {F}:\n    def __init__(self, value):\n        self.value = value\n\n    def {f}(self):\n        return self.value * {n}\n",
]


class Corpus:
    """Deterministic pseudo-English: words from syllables, Zipf-distributed, in sentences."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        syllables = [c + v + e for c in "bcdfghklmnprstvwz" for v in "aeiou" for e in ("", "n", "r", "s", "l", "t")]
        words = sorted({"".join(rng.choices(syllables, k=rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))) for _ in range(60000)})
        rng.shuffle(words)
        self.words = words
        cumulative, total = [], 0.0
        for rank in range(len(words)):
            total += 1 / (rank + 10)
            cumulative.append(total)
        self.sentences = []
        for _ in range(30000):
            n = rng.randint(4, 24)
            sentence = " ".join(rng.choices(words, cum_weights=cumulative, k=n))
            self.sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".....?!,"))
        self.rng = rng

    def text(self, sentences: int) -> str:
        return " ".join(self.rng.choices(self.sentences, k=sentences))

    def code(self) -> str:
        word = self.rng.choice(self.words[:2000])
        return self.rng.choice(CODE).format(
            f=word, F=word.capitalize(), a=self.rng.choice(self.words[:500]), n=self.rng.randint(2, 999)
        )


def chatgpt_html(corpus: Corpus, rng: random.Random, size: int) -> str:
    """A reply as ShareGPT's HTML dumps hold it."""
    parts, length = [], 0
    while length < size:
        kind = rng.random()
        if kind < 0.55:
            part = f"<p>{corpus.text(rng.randint(1, 5))}</p>"
        elif kind < 0.75:
            items = "".join(f"<li><p>{corpus.text(rng.randint(1, 2))}</p></li>" for _ in range(rng.randint(2, 6)))
            tag = "ol" if rng.random() < 0.5 else "ul"
            part = f"<{tag}>{items}</{tag}>"
        elif kind < 0.95:
            code = corpus.code()
            highlighted = re.sub(
                r"\b(def|class|return|for|if|import|in)\b", r'<span class="hljs-keyword">\1</span>', code
            )
            part = (
                '<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200 '
                'bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">python</span><button class="flex ml-auto '
                'gap-2"><svg stroke="currentColor" fill="none" stroke-width="2" viewBox="0 0 24 24" '
                'stroke-linecap="round" stroke-linejoin="round" class="h-4 w-4" height="1em" width="1em" '
                'xmlns="http://www.w3.org/2000/svg"><path d="M16 4h2a2 2 0 0 1 2 2v14a2 2 0 0 1-2 2H6a2 2 0 0 1-2-2V6a2 '
                '2 0 0 1 2-2h2"></path><rect x="8" y="2" width="8" height="4" rx="1" ry="1"></rect></svg>Copy code'
                '</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-python">'
                f"{highlighted}</code></div></div></pre>"
            )
        else:
            rows = "".join(
                f"<tr><td>{rng.choice(corpus.words)}</td><td>{rng.randint(1, 99)}</td></tr>"
                for _ in range(rng.randint(2, 5))
            )
            part = f"<table><thead><tr><th>name</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"
        parts.append(part)
        length += len(part)
    return '<div class="markdown prose w-full break-words dark:prose-invert light">' + "".join(parts) + "</div>"


def chatgpt_markdown(corpus: Corpus, rng: random.Random, size: int) -> str:
    """A reply as the cleaned ShareGPT files (ShareGPT_V3_unfiltered_cleaned_split.json) hold it."""
    parts, length = [], 0
    while length < size:
        kind = rng.random()
        if kind < 0.55:
            part = corpus.text(rng.randint(1, 5))
        elif kind < 0.75:
            part = "\n".join(f"{i + 1}. {corpus.text(rng.randint(1, 2))}" for i in range(rng.randint(2, 6)))
        elif kind < 0.95:
            part = f"```python\n{corpus.code()}```"
        else:
            rows = "\n".join(f"| {rng.choice(corpus.words)} | {rng.randint(1, 99)} |" for _ in range(rng.randint(2, 5)))
            part = f"| name | value |\n| --- | --- |\n{rows}"
        parts.append(part)
        length += len(part)
    return "\n\n".join(parts)


def make_dataset(path: Path, n: int, seed: int = 0, html: bool = True) -> dict:
    corpus = Corpus(seed)
    rng = random.Random(seed + 1)
    planted = dict.fromkeys(
        ("duplicate", "empty_reply", "assistant_first", "two_user_turns", "bing_bard", "tool_turn", "not_english"), 0
    )
    earlier: list[list] = []
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            fault = rng.random()
            if fault < 0.02 and earlier:
                turns = rng.choice(earlier)
                planted["duplicate"] += 1
            else:
                exchanges = min(20, max(1, int(rng.expovariate(1 / 4.5)) + 1))
                turns = []
                foreign = GERMAN if rng.random() < 0.5 else CHINESE
                for _ in range(exchanges):
                    if fault < 0.08 and fault >= 0.05:
                        user = " ".join(rng.choices(foreign, k=rng.randint(1, 4)))
                    else:
                        user = corpus.text(rng.randint(1, 8))
                    turns.append({"from": "human", "value": user})
                    reply = chatgpt_html if html else chatgpt_markdown
                    turns.append({"from": "gpt", "value": reply(corpus, rng, int(rng.lognormvariate(7.0, 0.8)))})
                if 0.05 <= fault < 0.08:
                    planted["not_english"] += 1
                elif 0.08 <= fault < 0.09 and len(turns) > 2:
                    turns[-1 if len(turns) == 2 else 3]["value"] = ""
                    planted["empty_reply"] += 1
                elif 0.09 <= fault < 0.10:
                    turns.insert(0, {"from": "gpt", "value": "<p>Hello! How can I help?</p>"})
                    planted["assistant_first"] += 1
                elif 0.10 <= fault < 0.11 and len(turns) > 2:
                    turns[1] = {"from": "human", "value": corpus.text(1)}
                    planted["two_user_turns"] += 1
                elif 0.11 <= fault < 0.12:
                    turns[1]["from"] = rng.choice(("bing", "bard"))
                    planted["bing_bard"] += 1
                elif 0.12 <= fault < 0.125:
                    turns.append({"from": "tool", "value": '{"result": 1}'})
                    planted["tool_turn"] += 1
                if len(earlier) < 2000:
                    earlier.append(turns)
                elif rng.random() < 0.01:
                    earlier[rng.randrange(len(earlier))] = turns
            record = {"id": f"sg{i:06d}", "conversations": turns}
            f.write(("" if i == 0 else ",\n") + json.dumps(record, ensure_ascii=False, indent=2))
        f.write("\n]\n")
    return planted


def make_tokenizer(folder: Path, source: Path) -> Path:
    """A 32,000-piece LLaMA-style SentencePiece BPE trained on the first conversations, as HF files."""
    if (folder / "tokenizer.json").is_file():
        return folder
    from vicunaflow.synth import train_tokenizer
    from vicunaflow.tokenizer import write_tokenizer

    lines = []
    with open(source, encoding="utf-8") as f:
        for line in f:
            if '"value"' in line and len(lines) < 40000:
                lines.append(re.sub(r"<[^>]+>", " ", json.loads("{" + line.strip().rstrip(",") + "}")["value"])[:2000])
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "tokenizer.model"
    model.write_bytes(train_tokenizer(32000, corpus=lines, character_coverage=0.9995))
    write_tokenizer(model, folder)
    return folder


# ---- running and measuring ------------------------------------------------------------------------------


def measured(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run a command; wall seconds, CPU seconds (user + system, its workers included) and the peak RSS of
    its process tree (every 50 ms); printed as it ends. On a loaded machine CPU seconds vary less than wall;
    the 1-minute load average before and after says how loaded it was (other people's jobs included)."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = [0]

        def poll():
            root = psutil.Process(process.pid)
            while process.poll() is None:
                try:
                    rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                    peak[0] = max(peak[0], rss)
                except psutil.Error:
                    pass
                time.sleep(0.05)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        code = process.wait()
        thread.join()
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    result = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mb": round(peak[0] / 2**20, 1),
              "load_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}  # fmt: skip
    print(f"{log.stem}: {result}", flush=True)
    return result


FASTCHAT_SPLIT = """
import json, sys
from transformers import AutoTokenizer
from fastchat.data import split_long_conversation as s
source, out, tokenizer_dir, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
content = json.load(open(source))
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, model_max_length=limit, padding_side="right")
new = s.filter_invalid_roles(s.split_all(content, 0, len(content), tokenizer, limit))
print(f"#in: {len(content)}, #out: {len(new)}")
json.dump(new, open(out, "w"), indent=2, ensure_ascii=False)
"""

OURS = """
import sys
from vicunaflow.log import setup_logging
setup_logging("WARNING")
from vicunaflow.dataprep.{module} import {verb}
{verb}(**{kwargs})
"""


def run_ours(
    work: Path, source: Path, tokenizer: Path, limit: int, jobs: int, languages: list[str] | None,
    src: Path = REPO / "src", tag: str = "ours",
) -> dict:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    clean_args = {"data": str(source), "output": str(work / f"{tag}-clean.jsonl"), "jobs": jobs, "languages": languages}
    split_args = {"data": str(work / f"{tag}-clean.jsonl"), "model_path": str(tokenizer),
                  "output": str(work / f"{tag}-split.jsonl"), "model_max_length": limit}  # fmt: skip
    result = {
        "clean": measured(
            [sys.executable, "-c", OURS.format(module="clean", verb="clean", kwargs=clean_args)],
            work / f"{tag}-clean.log",
            env,
        ),
        "split": measured(
            [sys.executable, "-c", OURS.format(module="split", verb="split", kwargs=split_args)],
            work / f"{tag}-split.log",
            env,
        ),
    }
    counts = {}
    for step in ("clean", "split"):
        for row in (work / f"{tag}-{step}.counts.tsv").read_text().splitlines()[1:]:
            _, kind, reason, n, _ = row.split("\t")
            counts[f"{step}:{kind}:{reason}"] = int(n)
    result["counts"] = counts
    return result


def run_before_and_after(args, work: Path, source: Path, tokenizer: Path) -> dict:
    """Our clean + split from commit `args.before` and from the working tree, alternating, `args.repeat`
    times each; per step the median wall time (every run listed) and the largest peak RSS."""
    before_src = work / f"src-{args.before}"
    if not before_src.is_dir():
        before_src.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.before, "src"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive.stdout, check=True)
    sides = {"before": before_src / "src", "ours": REPO / "src"}
    runs: dict = {side: [] for side in sides}
    for i in range(args.repeat):
        for side in sides if i % 2 == 0 else reversed(list(sides)):
            runs[side].append(
                run_ours(work, source, tokenizer, args.limit, args.jobs, args.languages, sides[side], side)
            )
    results = {}
    for side, done in runs.items():
        result = dict(done[-1])
        for step in ("clean", "split"):
            seconds = [r[step]["seconds"] for r in done]
            cpu = [r[step]["cpu_seconds"] for r in done]
            result[step] = {"seconds": round(statistics.median(seconds), 2), "runs": seconds,
                            "cpu_seconds": round(statistics.median(cpu), 2), "cpu_runs": cpu,
                            "peak_rss_mb": max(r[step]["peak_rss_mb"] for r in done),
                            "load_1m_before_after": [r[step].get("load_1m_before_after") for r in done]}  # fmt: skip
        results[side] = result
    results["before"]["commit"] = args.before
    results["same_bytes_as_before"] = {
        name: filecmp.cmp(work / f"before-{name}", work / f"ours-{name}", shallow=False)
        for name in ("clean.jsonl", "clean.counts.tsv", "split.jsonl", "split.counts.tsv")
    }
    return results


def run_fastchat(work: Path, source: Path, tokenizer: Path, limit: int) -> dict:
    result = {
        "clean": measured(
            [
                sys.executable,
                "-m",
                "fastchat.data.clean_sharegpt",
                "--in-file",
                str(source),
                "--out-file",
                str(work / "fastchat-clean.json"),
            ],
            work / "fastchat-clean.log",
        ),
        "split": measured(
            [
                sys.executable,
                "-c",
                FASTCHAT_SPLIT,
                str(work / "fastchat-clean.json"),
                str(work / "fastchat-split.json"),
                str(tokenizer),
                str(limit),
            ],
            work / "fastchat-split.log",
        ),
    }
    summary = [line for line in (work / "fastchat-clean.log").read_text().splitlines() if line.startswith("total:")]
    result["clean_summary"] = summary[-1] if summary else ""
    return result


def records(path: Path):
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
    else:
        import ijson

        with open(path, "rb") as f:
            yield from ijson.items(f, "item")


def check(clean_path: Path, split_path: Path, tokenizer_dir: Path, limit: int, sample: int) -> dict:
    """What a side kept: conversations, pieces, replies; pieces over the limit by exact length."""
    from vicunaflow.data import load_tokenizer
    from vicunaflow.dataprep.split import PieceCounter

    counter = PieceCounter(load_tokenizer(tokenizer_dir))
    replies_in = sum(sum(t["from"] == "gpt" for t in r["conversations"]) for r in records(clean_path))
    conversations = sum(1 for _ in records(clean_path))
    pieces = empty = bad_edges = replies_out = over = checked = 0
    rng = random.Random(0)
    for piece in records(split_path):
        pieces += 1
        turns = piece["conversations"]
        replies_out += sum(t["from"] == "gpt" for t in turns)
        if not turns:
            empty += 1
            continue
        if turns[0]["from"] != "human" or turns[-1]["from"] != "gpt":
            bad_edges += 1
        if sample <= 0 or rng.random() < sample / 1e6:
            pairs = [(t["from"], t["value"]) for t in turns]
            checked += 1
            over += counter.whole_length(piece.get("system"), pairs) > limit
    return {
        "clean_conversations": conversations,
        "clean_replies": replies_in,
        "pieces": pieces,
        "empty_pieces": empty,
        "pieces_not_user_to_reply": bad_edges,
        "replies_after_split": replies_out,
        "replies_lost_in_split": replies_in - replies_out,
        "pieces_checked_for_length": checked,
        "pieces_over_limit": over,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=90000, help="conversations in the synthetic dump")
    parser.add_argument("--limit", type=int, default=2048, help="model_max_length of the split")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="our clean's worker processes")
    parser.add_argument("--only", choices=("ours", "fastchat", "both"), default="both")
    parser.add_argument("--markdown", action="store_true", help="replies in Markdown (a cleaned dump), not HTML")
    parser.add_argument("--languages", nargs="*", help="our clean's language filter (FastChat has none)")
    parser.add_argument("--work", type=Path, default=REPO / ".work" / "bench-data")
    parser.add_argument("--check-sample", type=int, default=0,
                        help="pieces per million checked for exact length (0: all)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="results JSON; default bench/results/data_<n>.json")
    parser.add_argument("--before", metavar="REV", help="also run our steps from this commit's src/, alternating")
    parser.add_argument("--repeat", type=int, default=1, help="with --before: runs of each side (medians)")
    parser.add_argument("--machine", default="", help="recorded in the results: where this ran")
    args = parser.parse_args()
    name = f"{args.n}{'-markdown' if args.markdown else ''}"
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    source = work / "sharegpt_html.json"
    results: dict = {
        "n": args.n,
        "replies": "markdown" if args.markdown else "html",
        "limit": args.limit,
        "cpus": len(os.sched_getaffinity(0)),
        "jobs": args.jobs,
    }
    if not source.is_file():
        started = time.perf_counter()
        with tempfile.NamedTemporaryFile(dir=work, delete=False) as tmp:
            planted = make_dataset(Path(tmp.name), args.n, html=not args.markdown)
        os.replace(tmp.name, source)
        (work / "planted.json").write_text(json.dumps(planted))
        print(f"made {source} in {time.perf_counter() - started:.0f}s", flush=True)
    results["input_mb"] = round(source.stat().st_size / 1e6, 1)
    results["planted"] = json.loads((work / "planted.json").read_text())
    tokenizer = make_tokenizer(args.work / "tokenizer-32k", source)
    if args.machine:
        results["machine"] = args.machine
    if args.only in ("ours", "both") and args.before:
        results |= run_before_and_after(args, work, source, tokenizer)
        print(json.dumps({k: results[k] for k in ("before", "ours", "same_bytes_as_before")}, indent=1), flush=True)
    elif args.only in ("ours", "both"):
        results["ours"] = run_ours(work, source, tokenizer, args.limit, args.jobs, args.languages)
    if args.only in ("ours", "both"):
        results["ours"]["kept"] = check(work / "ours-clean.jsonl", work / "ours-split.jsonl", tokenizer, args.limit,
                                        args.check_sample)  # fmt: skip
        print(json.dumps(results["ours"], indent=1), flush=True)
    if args.only in ("fastchat", "both"):
        results["fastchat"] = run_fastchat(work, source, tokenizer, args.limit)
        results["fastchat"]["kept"] = check(work / "fastchat-clean.json", work / "fastchat-split.json", tokenizer,
                                            args.limit, args.check_sample)  # fmt: skip
        print(json.dumps(results["fastchat"], indent=1), flush=True)
    out = args.out or RESULTS / f"data_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only != "both" and out.is_file():  # one side rerun: keep the other side's numbers
        results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    print_table(results)


def print_table(results: dict) -> None:
    sides = [s for s in ("before", "ours", "fastchat") if s in results]
    rows = [("clean s", lambda r: r["clean"]["seconds"]), ("split s", lambda r: r["split"]["seconds"]),
            ("clean+split s", lambda r: round(r["clean"]["seconds"] + r["split"]["seconds"], 1)),
            ("clean CPU s", lambda r: r["clean"].get("cpu_seconds", "")), ("split CPU s", lambda r: r["split"].get("cpu_seconds", "")),
            ("peak RSS clean MB", lambda r: r["clean"]["peak_rss_mb"]), ("peak RSS split MB", lambda r: r["split"]["peak_rss_mb"])]  # fmt: skip
    kept = next((results[s]["kept"] for s in sides if "kept" in results[s]), {})
    rows += [(key, lambda r, key=key: r.get("kept", {}).get(key, "")) for key in kept]
    print(f"{'':32}" + "".join(f"{s:>14}" for s in sides))
    for name, get in rows:
        print(f"{name:32}" + "".join(f"{get(results[s])!s:>14}" for s in sides))


if __name__ == "__main__":
    main()
