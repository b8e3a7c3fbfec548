"""`chatgate chat`: chat with a registered model from a terminal, through a running chatgate.

Interactive on a terminal: prompt_toolkit for line editing and history (Esc then Enter, or
Alt-Enter, for a new line), the answer streamed and rendered as Markdown by rich, a status line
after it. Ctrl-C stops the answer (closing the HTTP stream, so chatgate closes the upstream) and
returns to the prompt; Ctrl-D or /exit leaves. One-shot for scripts: `-m TEXT` or a piped stdin
prints the answer alone and exits 1 with the error on stderr when it fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from chatgate.chat_client import Answer, ChatClient, ChatFailed
from chatgate.config import Settings

PROMPT = "you> "
HELP = """\
Commands:
  /model [NAME]      switch model (without NAME: pick from the list)
  /system [TEXT]     set the system prompt (without TEXT: remove it)
  /temperature [T]   set the sampling temperature (without T: the model's default)
  /clear             forget the conversation
  /retry             ask the last question again
  /save FILE         write the conversation to FILE as Markdown
  /help              this list
  /exit              leave (Ctrl-D too)
Enter sends; Esc then Enter (or Alt-Enter) starts a new line. Ctrl-C stops an answer."""


@dataclass
class Conversation:
    """What the next request carries: the model, the settings and the turns so far."""

    model: str
    system: str | None = None
    temperature: float | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    unanswered: str | None = None  # the last question, when its answer failed

    def payload(self) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        payload: dict[str, Any] = {"model": self.model, "messages": messages + self.turns}
        if self.temperature is not None:
            payload["temperature"] = self.temperature
        return payload

    def markdown(self) -> str:
        lines = [f"# Chat with {self.model}", ""]
        if self.system:
            lines += ["**System:**", "", self.system, ""]
        for turn in self.turns:
            lines += [f"## {'You' if turn['role'] == 'user' else self.model}", "", turn["content"], ""]
        return "\n".join(lines)


def start(
    settings: Settings,
    model: str | None,
    message: str | None,
    *,
    url: str | None,
    token: str | None,
    system: str | None,
    temperature: float | None,
    history: Path | None,
) -> int:
    """`chatgate chat`: one question (`message`, or stdin when it is not a terminal) or the
    interactive chat; returns the exit status, raises `ChatFailed` with the words to print."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # noqa: S104 - a bind-all address
    if token is None:
        path = settings.admin_token_path
        try:
            token = path.read_text().strip()
        except OSError:
            raise ChatFailed(f"no token: give --token or set CHATGATE_TOKEN (no {path} to read here)", code=2) from None
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read()
        if not message.strip():
            raise ChatFailed("nothing to ask: stdin was empty", code=2)
    if message is not None and model is None:
        raise ChatFailed("say which model to ask: chatgate chat MODEL -m TEXT", code=2)
    console = Console()
    client = ChatClient(url or f"http://{host}:{settings.port}", token)
    try:
        if message is not None:
            assert model is not None
            return one_shot(client, Conversation(model, system, temperature), message, console)
        if model is None:
            model = pick_model(client, console, input)
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "chatgate"
        return interactive(client, Conversation(model, system, temperature), console, history or state / "history")
    finally:
        client.close()


def one_shot(client: ChatClient, conversation: Conversation, message: str, console: Console) -> int:
    """Ask once and print only the answer (plain text unless stdout is a terminal); 1 on failure."""
    conversation.turns.append({"role": "user", "content": message})
    answer = Answer(conversation.model)
    try:
        if console.is_terminal:
            _render(client, conversation, answer, console)
        else:
            for text in client.stream(answer, conversation.payload()):
                sys.stdout.write(text)
                sys.stdout.flush()
            if not answer.text.endswith("\n"):
                sys.stdout.write("\n")
    except ChatFailed as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc.message}", highlight=False)
        return 1
    return 0


def pick_model(client: ChatClient, console: Console, ask: Callable[[str], str]) -> str:
    """The model to chat with: the only one, or the one the person picks from the list."""
    models = client.models()
    if not models:
        raise ChatFailed("this token may use no model yet: register one with `chatgate models add`")
    if len(models) == 1:
        return str(models[0]["id"])
    for number, model in enumerate(models, 1):
        console.print(f"  {number}. {model['id']}", highlight=False)
    while True:
        choice = ask("Model (number or name): ").strip()
        ids = [str(m["id"]) for m in models]
        if choice.isdigit() and 1 <= int(choice) <= len(ids):
            return ids[int(choice) - 1]
        if choice in ids:
            return choice
        console.print(f"Pick a number from 1 to {len(ids)}.")


def interactive(client: ChatClient, conversation: Conversation, console: Console, history: Path | None) -> int:
    """The prompt loop; returns the exit status."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    if history is not None:
        history.parent.mkdir(parents=True, exist_ok=True)
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(history)) if history is not None else InMemoryHistory(),
        key_bindings=bindings,
    )
    console.print(f"Chatting with {conversation.model} at {client.url}. /help lists the commands.", highlight=False)
    while True:
        try:
            line = session.prompt(PROMPT)
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line, as in a shell
        except EOFError:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(text, client, conversation, console, session.prompt) == "exit":
                return 0
            continue
        conversation.turns.append({"role": "user", "content": line})
        _answer(client, conversation, console)


def _answer(client: ChatClient, conversation: Conversation, console: Console) -> None:
    answer = Answer(conversation.model)
    try:
        _render(client, conversation, answer, console)
    except KeyboardInterrupt:
        answer.stopped = True
    except ChatFailed as exc:
        console.print(f"[red]error:[/] {exc.message}", highlight=False)
        # Not answered: out of the conversation, but kept for /retry.
        conversation.unanswered = conversation.turns.pop()["content"]
        return
    if answer.text:
        conversation.turns.append({"role": "assistant", "content": answer.text})
        conversation.unanswered = None
    else:  # stopped before any text
        conversation.unanswered = conversation.turns.pop()["content"]
    console.print(f"[dim]{answer.status_line()}[/]", highlight=False)


def _render(client: ChatClient, conversation: Conversation, answer: Answer, console: Console) -> None:
    # The Live region is redrawn as text arrives (at most 12 times a second, not once per token).
    with Live(Markdown(""), console=console, refresh_per_second=12, vertical_overflow="visible") as live:
        stream = client.stream(answer, conversation.payload())
        try:
            for _ in stream:
                live.update(Markdown(answer.text))
        finally:
            stream.close()  # on Ctrl-C too: the response closes, and with it the connection
            live.update(Markdown(answer.text))


def _command(
    text: str, client: ChatClient, conversation: Conversation, console: Console, ask: Callable[[str], str]
) -> str | None:
    name, _, argument = text.partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/help":
        console.print(HELP, highlight=False, markup=False)
    elif name == "/model":
        try:
            conversation.model = argument or pick_model(client, console, ask)
        except ChatFailed as exc:
            console.print(f"[red]error:[/] {exc.message}", highlight=False)
            return None
        console.print(f"Now chatting with {conversation.model}.", highlight=False)
    elif name == "/system":
        conversation.system = argument or None
        console.print("System prompt set." if argument else "System prompt removed.")
    elif name == "/temperature":
        try:
            conversation.temperature = float(argument) if argument else None
        except ValueError:
            console.print(f"Not a number: {argument}", highlight=False)
    elif name == "/clear":
        conversation.turns.clear()
        conversation.unanswered = None
        console.print("Conversation cleared.")
    elif name == "/retry":
        while conversation.turns and conversation.turns[-1]["role"] == "assistant":
            conversation.turns.pop()
        if conversation.unanswered is not None:
            conversation.turns.append({"role": "user", "content": conversation.unanswered})
        if not conversation.turns:
            console.print("Nothing to retry yet.")
        else:
            _answer(client, conversation, console)
    elif name == "/save":
        if not argument:
            console.print("Say where: /save FILE")
            return None
        path = Path(argument).expanduser()
        try:
            path.write_text(conversation.markdown(), encoding="utf-8")
        except OSError as exc:
            console.print(f"[red]error:[/] cannot write {path}: {exc.strerror or exc}", highlight=False)
            return None
        console.print(f"Saved to {path}.", highlight=False)
    else:
        console.print(f"Unknown command {name}; /help lists them.", highlight=False)
    return None
