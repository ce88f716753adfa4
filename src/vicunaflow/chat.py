"""`vicunaflow chat`: talk to a Vicuna in the terminal, or answer a fixed prompt list into JSON.

Replaces FastChat's `python -m fastchat.serve.cli` (which no longer runs on transformers 5), with
its flags. Replies stream token by token through the same engine the server uses
(vicunaflow.engine), in the Vicuna v1.1 format of vicunaflow.template. Questions come from a
terminal or, one per line, from piped stdin; a conversation longer than the context drops its
oldest exchanges instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Literal

from vicunaflow import VicunaflowError, require_file, template
from vicunaflow.engine import Engine, SamplingParams, check_max_context, encode_prompt, fit_conversation, timed
from vicunaflow.loading import DEFAULT_MODEL_OPTIONS, ModelOptions
from vicunaflow.outputs import atomic_write_bytes, check_output_files, tool_versions

log = logging.getLogger(__name__)

COMMANDS_HELP = (
    "commands: !!exit, !!reset (new conversation), !!remove (drop the last exchange), "
    "!!regen (answer the last question again), !!save FILE, !!load FILE"
)


def chat(
    *,
    model_path: Path,
    model_options: ModelOptions = DEFAULT_MODEL_OPTIONS,
    style: Literal["simple", "rich"] = "simple",
    multiline: bool = False,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    max_context: int | None = None,
    seed: int | None = None,
    cuda_graphs: bool = True,
    prompts: Path | None = None,
    output: Path | None = None,
    overwrite: bool = False,
) -> None:
    """Chat with a model in the terminal (streamed, multi-turn), or answer --prompts into --output JSON.

    Commands typed as a message: !!exit, !!reset, !!remove, !!regen, !!save FILE, !!load FILE.
    With piped stdin every line is a question.

    Arguments:
        model_path: a Hugging Face model directory (e.g. vicuna-13b-all-v1.1).
        model_options: how the model loads (vicunaflow.loading.ModelOptions: --device, --num-gpus, --load-8bit, ...).
        style: simple (plain streamed text) or rich (Markdown rendered as it streams).
        multiline: a message ends with an empty line instead of at the end of the line.
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass.
        max_new_tokens: longest reply, in tokens.
        max_context: attend over at most this many tokens; default: the model's max_position_embeddings.
        seed: sampling seed, for reproducible sampled replies.
        cuda_graphs: on one GPU, replay each decode step from a captured CUDA graph (false: plain eager forward).
        prompts: a file of prompts, one per line: each is answered greedily in a fresh conversation.
        output: with --prompts: the JSON file to write the transcripts to (results/chat/<model>.json).
        overwrite: replace output files that exist but are not this verb's unchanged earlier outputs (default: refuse).
    """
    log.info(
        "chat: model_path=%s %s temperature=%s top_p=%s max_new_tokens=%d prompts=%s output=%s",
        model_path, model_options, temperature, top_p, max_new_tokens, prompts, output,
    )  # fmt: skip
    if (prompts is None) != (output is None):
        raise VicunaflowError("--prompts and --output go together: answer a prompt file into a JSON file")
    if prompts is not None:
        require_file(prompts, "prompt file", "a text file of prompts, one per line")
    if output is not None:  # before the model loads: the transcripts must not replace an input
        check_output_files({"--output": output}, inputs=[prompts, model_path], overwrite=overwrite)
    if max_new_tokens < 1:
        raise VicunaflowError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    check_max_context(max_context)
    if not 0.0 < top_p <= 1.0:
        raise VicunaflowError(f"--top-p {top_p}: must be in (0, 1]")
    if temperature < 0:
        raise VicunaflowError(f"--temperature {temperature}: must be >= 0")
    model, tokenizer = model_options.load(model_path, one_stream=True)
    with (
        contextlib.closing(model),
        Engine(
            model, tokenizer, max_batch_size=1, max_context=max_context, seed=seed, cuda_graphs=cuda_graphs
        ) as engine,
    ):
        _check_room(engine, max_new_tokens, interactive=prompts is None, given=max_context is not None)
        if prompts is not None:
            if temperature != 0:
                log.info("--prompts answers greedily: temperature %s -> 0", temperature)
            params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
            answer_prompts(engine, Path(model_path), Path(prompts), Path(output), params)
        else:
            params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
            terminal = RichIO() if style == "rich" else SimpleIO()
            Conversation(engine, terminal, params, multiline=multiline).run()


def _check_room(engine: Engine, max_new_tokens: int, interactive: bool, given: bool) -> None:
    """A context too short for the system prompt and a one-token message (--max-context 40) is refused up front,
    not noted message after message with an exit status of 0. Interactive messages get the budget answer() gives
    them: the context less the reply's share (up to half of it)."""
    prompt = template.render([(template.USER, "?"), (template.ASSISTANT, None)])
    least, context = len(encode_prompt(engine.tokenizer, prompt)), engine.context
    room = context - min(max_new_tokens, context // 2) if interactive else context - 1
    if least > room:
        need = min(2 * least, least + max_new_tokens) if interactive else least + 1
        what = (
            f"--max-context {context}"
            if given
            else f"the model's context of {context} tokens (max_position_embeddings)"
        )
        fix = f"give --max-context {need} or more, or leave it out for the model's max_position_embeddings"
        raise VicunaflowError(
            f"{what}: the system prompt and a one-word message take {least} tokens, leaving no room"
            f"{' (half the context is kept for the reply)' if interactive else ''}; "
            + (fix if given else "use a model with a longer context")
        )


def answer_prompts(engine: Engine, model_path: Path, prompts: Path, output: Path, params: SamplingParams) -> dict:
    """Answer each prompt in a fresh conversation; write the transcripts as JSON, atomically."""
    try:
        text = prompts.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise VicunaflowError(f"{prompts}: not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    questions = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not questions:
        raise VicunaflowError(f"{prompts}: no prompts (one per line; # starts a comment)")
    transcripts = []
    for question in questions:
        turns = [(template.USER, question), (template.ASSISTANT, None)]
        ids = encode_prompt(engine.tokenizer, template.render(turns))
        if len(ids) >= engine.context:
            shown = question if len(question) <= 60 else question[:60] + "..."
            raise VicunaflowError(
                f"{prompts}: the prompt {shown!r} is {len(ids)} tokens with the system prompt, and the context "
                f"{engine.context}: shorten it (or raise --max-context, up to the model's max_position_embeddings)"
            )
        reply, last, seconds = timed(engine.generate(ids, _capped(engine, params, len(ids))))
        if last.finish_reason == "error":
            raise VicunaflowError(f"{prompts}: generation failed for {question!r}: {last.error}")
        print(f"{template.USER}: {question}\n{template.ASSISTANT}: {reply}\n", flush=True)
        transcripts.append(
            {
                "prompt": question,
                "reply": reply,
                "finish_reason": last.finish_reason,
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "seconds": round(seconds, 3),
            }
        )
    result = {
        "model": model_path.name,
        "model_path": str(model_path),
        "template": "vicuna_v1.1",
        "system": template.SYSTEM_PROMPT,
        "generation": {"temperature": params.temperature, "max_new_tokens": params.max_new_tokens},
        "versions": tool_versions(),
        "transcripts": transcripts,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, (json.dumps(result, indent=2, ensure_ascii=False) + "\n").encode())
    log.info("wrote %d transcripts to %s", len(transcripts), output)
    return result


def _capped(engine: Engine, params: SamplingParams, prompt_length: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_new_tokens=engine.max_new_tokens(prompt_length, params.max_new_tokens))


class Conversation:
    """The interactive loop: read a message or command, stream the reply, keep the history."""

    def __init__(self, engine: Engine, terminal: SimpleIO, params: SamplingParams, multiline: bool = False):
        self.engine, self.terminal, self.params, self.multiline = engine, terminal, params, multiline
        self.exchanges: list[tuple[str, str]] = []  # (question, reply), oldest first

    def run(self) -> None:
        self.terminal.note(COMMANDS_HELP)
        while True:
            message = self.terminal.read(f"{template.USER}: ", self.multiline)
            if message is None or message.strip() == "!!exit":
                break
            message = message.strip()
            if not message:
                continue
            if message.startswith("!!"):
                self.command(message)
            else:
                self.answer(message)

    def command(self, message: str) -> None:
        name, _, argument = message.partition(" ")
        argument = argument.strip()
        if name == "!!reset":
            self.exchanges = []
            self.terminal.note("[new conversation]")
        elif name == "!!remove":
            if self.exchanges:
                question, _ = self.exchanges.pop()
                self.terminal.note(f"[removed: {question}]")
            else:
                self.terminal.note("[nothing to remove]")
        elif name == "!!regen":
            if self.exchanges:
                question, _ = self.exchanges.pop()
                self.terminal.note(f"[regenerating the answer to: {question}]")
                self.answer(question)
            else:
                self.terminal.note("[nothing to regenerate]")
        elif name in ("!!save", "!!load") and not argument:
            self.terminal.note(f"[usage: {name} FILE]")
        elif name == "!!save" and Path(argument).exists() and not _saved_conversation(Path(argument)):
            self.terminal.note(f"[{argument} exists and is not a conversation !!save wrote: kept; give another name]")
        elif name == "!!save":
            messages = [
                {"role": role, "content": text}
                for q, a in self.exchanges
                for role, text in (("user", q), ("assistant", a))
            ]
            record = {"template": "vicuna_v1.1", "system": template.SYSTEM_PROMPT, "messages": messages}
            try:  # whole or not at all: a failed write leaves an earlier save as it was
                atomic_write_bytes(
                    argument, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode(), provenance=False
                )
                self.terminal.note(f"[saved {len(self.exchanges)} exchanges to {argument}]")
            except OSError as err:
                self.terminal.note(f"[cannot save to {argument}: {err.strerror}]")
        elif name == "!!load":
            try:
                self.exchanges = load_conversation(Path(argument))
            except (OSError, ValueError, VicunaflowError) as err:  # JSONDecodeError is a ValueError
                self.terminal.note(f"[cannot load {argument}: {err}; the current conversation is kept]")
                return
            for question, reply in self.exchanges:
                self.terminal.note(f"{template.USER}: {question}\n{template.ASSISTANT}: {reply}")
            self.terminal.note(f"[loaded {len(self.exchanges)} exchanges from {argument}]")
        else:
            self.terminal.note(f"[unknown command {name}; {COMMANDS_HELP}]")

    def answer(self, question: str) -> None:
        bad = next((ch for ch in question if "\udc80" <= ch <= "\udcff"), None)  # a byte Python could not decode
        if bad is not None:
            byte = ord(bad) - 0xDC00
            self.terminal.note(f"[the message is not UTF-8 text (byte 0x{byte:02x}); not sent: type or pipe UTF-8]")
            return
        turns = [t for q, a in self.exchanges for t in ((template.USER, q), (template.ASSISTANT, a))]
        turns += [(template.USER, question), (template.ASSISTANT, None)]
        context = self.engine.context
        budget = context - min(self.params.max_new_tokens, context // 2)
        try:
            kept, ids = fit_conversation(self.engine.tokenizer, turns, budget)
        except VicunaflowError as err:
            self.terminal.note(f"[{err}; not sent]")
            return
        dropped = (len(turns) - len(kept)) // 2
        if dropped:
            self.terminal.note(
                f"[the oldest {dropped} exchange(s) no longer fit the {context}-token context: left out]"
            )
        params = _capped(self.engine, self.params, len(ids))
        reply, failed = "", False
        events = self.engine.generate(ids, params)
        self.terminal.start_reply(f"{template.ASSISTANT}: ")
        try:
            for event in events:
                reply += event.text
                self.terminal.stream(event.text)
                if event.finish_reason == "error":
                    failed = True
                    self.terminal.end_reply()
                    self.terminal.note(f"[generation failed: {event.error}; the question is not kept]")
        except KeyboardInterrupt:
            events.close()  # cancels the request
            self.terminal.end_reply()
            if reply.strip():
                self.terminal.note("[interrupted: the partial answer is kept; !!regen answers again]")
            else:
                self.terminal.note("[interrupted before any text: the question is not kept]")
        else:
            if not failed:
                self.terminal.end_reply()
        # Neither a failed reply nor an empty stopped one stays in the history: the next prompt would send the
        # model a question with no (or a broken) answer. A stopped reply with text keeps it, for !!regen or !!remove.
        if not failed and reply.strip():
            self.exchanges.append((question, reply.strip()))


def _saved_conversation(path: Path) -> bool:
    """Whether `path` holds a conversation !!save wrote (which a later !!save may replace): a user's other file
    typed by mistake is kept."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("template") == "vicuna_v1.1" and "messages" in record


def load_conversation(path: Path) -> list[tuple[str, str]]:
    """Read a conversation saved by !!save (or a FastChat conversation dict with [role, text] pairs).

    A file that is not one (no "messages" list, entries that are neither {"role", "content"} nor [role, text])
    raises VicunaflowError, so that the conversation it was to replace is kept."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise VicunaflowError(f"not UTF-8 text (byte {err.start})") from None
    except ValueError as err:
        raise VicunaflowError(f"not JSON ({err})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise VicunaflowError(
            'not a conversation: no "messages" list (a JSON object as !!save writes, '
            '{"messages": [{"role", "content"}, ...]}, or a FastChat one with [role, text] pairs)'
        )
    pairs = []
    for number, message in enumerate(messages, 1):
        if isinstance(message, dict):
            role, text = message.get("role"), message.get("content")
        elif isinstance(message, list) and len(message) == 2:
            role, text = message
        else:
            raise VicunaflowError(f'message {number} is neither {{"role", "content"}} nor a [role, text] pair')
        if not isinstance(role, str) or not isinstance(text, (str, type(None))):
            raise VicunaflowError(f"message {number}: the role and the text must be strings")
        pairs.append((template.ROLE_OF.get(role.lower(), role.upper()), text or ""))
    exchanges = []
    for i in range(0, len(pairs) - 1, 2):
        (role_q, question), (role_a, reply) = pairs[i], pairs[i + 1]
        if role_q != template.USER or role_a != template.ASSISTANT:
            raise VicunaflowError("messages must alternate user, assistant")
        exchanges.append((question, reply))
    return exchanges


def _printable(text: str) -> str:
    """`text` with each undecodable byte (a lone surrogate) shown as U+FFFD, which any UTF-8 stdout can print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class SimpleIO:
    """Plain text: replies are written to stdout as they stream. Piped stdin is read line by line."""

    def __init__(self):
        self.interactive = sys.stdin.isatty()
        if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach answer(), which says so, not a traceback
            sys.stdin.reconfigure(errors="surrogateescape")
        if self.interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())

    def read(self, prompt: str, multiline: bool) -> str | None:
        lines: list[str] = []
        while True:
            try:
                if self.interactive:
                    line = input(prompt if not lines else "... ")
                else:
                    line = sys.stdin.readline()
                    if not line:
                        raise EOFError
                    line = line.rstrip("\n")
            except EOFError:
                return "\n".join(lines) if lines else None
            line = line.removesuffix("\r")  # Windows line endings (piped CRLF text): no "\r" reaches the model
            if not multiline:
                if not self.interactive:
                    print(f"{prompt}{_printable(line)}", flush=True)
                return line
            if not line.strip():
                if lines:
                    break
                continue
            lines.append(line)
        message = "\n".join(lines)
        if not self.interactive:
            print(f"{prompt}{_printable(message)}", flush=True)
        return message

    def start_reply(self, prefix: str) -> None:
        sys.stdout.write(prefix)
        sys.stdout.flush()

    def stream(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def end_reply(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()

    def note(self, text: str) -> None:
        print(text, flush=True)


class RichIO(SimpleIO):
    """Replies rendered as Markdown while they stream (rich.live)."""

    def __init__(self):
        super().__init__()
        from rich.console import Console

        self.console = Console()
        self.live = None
        self.text = ""

    def start_reply(self, prefix: str) -> None:
        from rich.live import Live

        self.console.print(f"[bold]{prefix.strip()}[/bold]")
        self.text = ""
        self.live = Live(console=self.console, refresh_per_second=8, vertical_overflow="visible")
        self.live.start()

    def stream(self, text: str) -> None:
        from rich.markdown import Markdown

        self.text += text
        self.live.update(Markdown(self.text))

    def end_reply(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)
