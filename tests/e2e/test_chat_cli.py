"""`chatgate chat` as a person uses it: on a real pseudo-terminal (pexpect), against a real chatgate
process and the fake upstream; and as a script uses it, with pipes and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from tests.support import ChatgateServer, FakeUpstream, free_port, scripts, unique_name

pytestmark = [pytest.mark.e2e, pytest.mark.backends("sqlite")]

UP = "\x1b[A"
PROMPT = "you>"  # prompt_toolkit draws the space after it as a cursor move


def registered(gateway: ChatgateServer, fake: FakeUpstream) -> str:
    """A model whose name is also its upstream id, so that scripts for the name apply."""
    name = unique_name("chat")
    gateway.add_model(name=name, base_url=fake.base_url, model_id=name)
    return name


@pytest.fixture
def terminal(gateway: ChatgateServer, tmp_path: Path) -> Iterator[list[pexpect.spawn]]:
    """Spawned chats, closed at the end of the test whatever happened."""
    spawned: list[pexpect.spawn] = []
    yield spawned
    for child in spawned:
        child.close(force=True)


def spawn(spawned: list[pexpect.spawn], gateway: ChatgateServer, tmp_path: Path, *args: str) -> pexpect.spawn:
    env = {**gateway.env, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "NO_COLOR": "1", "HOME": str(tmp_path)}
    # The terminal's own size, whatever the test run inherited (a COLUMNS=80 made rich wrap lines).
    env.update(COLUMNS="160", LINES="40")
    argv = ["-m", "chatgate", "chat", *args, "--url", gateway.url, "--token", gateway.admin_token]
    argv += ["--history", str(tmp_path / "history")]
    child = pexpect.spawn(
        sys.executable, argv, env=env, cwd=str(tmp_path), encoding="utf-8", timeout=30, dimensions=(40, 160)
    )
    spawned.append(child)
    child.expect(r"/help\s+lists\s+the\s+commands")
    child.expect_exact(PROMPT)
    return child


def test_the_answer_streams_onto_the_terminal_before_it_ends(
    gateway: ChatgateServer, fake: FakeUpstream, terminal: list[pexpect.spawn], tmp_path: Path
) -> None:
    name = registered(gateway, fake)
    gate = unique_name("gate")
    steps = [{"role": "assistant"}, {"delta": "Streamed before the gate."}, {"wait": gate}]
    steps += [{"delta": " And after it."}, {"finish": "stop"}, {"usage": True}, {"done": True}]
    fake.script(name, {"steps": steps})
    chat = spawn(terminal, gateway, tmp_path, name)

    chat.sendline("hello")
    chat.expect("Streamed before the gate")
    # On the terminal while the upstream is still parked at the gate: streamed, not buffered.
    assert fake.gates()["waiting"].get(gate) == 1
    fake.release(gate)
    chat.expect("And after it")
    chat.expect(rf"{name} · \d+ tokens · first token [\d.]+ s")
    chat.expect_exact(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_the_upstream_and_returns_to_the_prompt(
    gateway: ChatgateServer, fake: FakeUpstream, terminal: list[pexpect.spawn], tmp_path: Path
) -> None:
    name = registered(gateway, fake)
    fake.script(
        name,
        [
            {"steps": [{"role": "assistant"}, {"delta": "An endless answer"}, {"hang": True}]},
            scripts.stream("Still here."),
        ],
    )
    chat = spawn(terminal, gateway, tmp_path, name)

    chat.sendline("go on forever")
    chat.expect("An endless answer")
    chat.sendcontrol("c")
    chat.expect("stopped")
    closed = fake.wait_for_closed(name, timeout=10)
    assert [c["closed_by"] for c in closed] == ["peer"]  # chatgate hung up on the upstream
    # Still in the chat: the next question is answered.
    chat.expect_exact(PROMPT)
    chat.sendline("are you there?")
    chat.expect("Still here.")
    chat.expect_exact(PROMPT)
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_up_arrow_recalls_the_last_question(
    gateway: ChatgateServer, fake: FakeUpstream, terminal: list[pexpect.spawn], tmp_path: Path
) -> None:
    name = registered(gateway, fake)
    fake.script(name, scripts.stream("Answered."))
    chat = spawn(terminal, gateway, tmp_path, name)

    chat.sendline("the first question")
    chat.expect("Answered.")
    chat.expect_exact(PROMPT)
    chat.send(UP)
    chat.expect("the first question")
    chat.send("\r")
    chat.expect("Answered.")
    chat.expect_exact(PROMPT)
    first, second = fake.wait_for_requests(name, 2)
    asked = [m["content"] for m in second["body"]["messages"] if m["role"] == "user"]
    assert asked == ["the first question", "the first question"]
    assert [m["role"] for m in second["body"]["messages"]] == ["user", "assistant", "user"]
    assert first["body"]["stream"] is True
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    # The history outlives the session.
    assert "the first question" in (tmp_path / "history").read_text()


def test_save_writes_the_conversation_as_markdown(
    gateway: ChatgateServer, fake: FakeUpstream, terminal: list[pexpect.spawn], tmp_path: Path
) -> None:
    name = registered(gateway, fake)
    fake.script(name, scripts.stream("The **answer**", " is 42."))
    chat = spawn(terminal, gateway, tmp_path, name)

    chat.sendline("/system Be brief.")
    chat.expect("System prompt set")
    chat.expect_exact(PROMPT)
    chat.sendline("What is the answer?")
    chat.expect("is 42")
    assert "**" not in chat.before  # rendered as Markdown, not shown as typed
    chat.expect_exact(PROMPT)
    chat.sendline("/save transcript.md")
    chat.expect("Saved to transcript.md")
    assert (tmp_path / "transcript.md").read_text() == (
        f"# Chat with {name}\n\n**System:**\n\nBe brief.\n\n"
        f"## You\n\nWhat is the answer?\n\n## {name}\n\nThe **answer** is 42.\n"
    )
    assert fake.requests(name)[0]["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)


def chat_cli(gateway: ChatgateServer, *args: str, input: str | None = None, url: str | None = None):  # type: ignore[no-untyped-def]
    return gateway.cli("chat", *args, "--url", url or gateway.url, "--token", gateway.admin_token, input=input)


def test_one_shot_prints_only_the_answer(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name = registered(gateway, fake)
    fake.script(name, scripts.stream("Only ", "this."))
    result = chat_cli(gateway, name, "-m", "a question")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Only this.\n"
    assert fake.requests(name)[0]["body"]["messages"] == [{"role": "user", "content": "a question"}]


def test_one_shot_reads_the_question_from_stdin(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    name = registered(gateway, fake)
    fake.script(name, scripts.stream("Read it."))
    result = chat_cli(gateway, name, input="line one\nline two\n")
    assert (result.returncode, result.stdout) == (0, "Read it.\n"), result.stderr
    assert fake.requests(name)[0]["body"]["messages"][-1]["content"] == "line one\nline two\n"


def test_one_shot_failures_exit_non_zero_in_plain_words(gateway: ChatgateServer, fake: FakeUpstream) -> None:
    missing = chat_cli(gateway, unique_name("nosuch"), "-m", "hi")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr and missing.stdout == ""

    name = registered(gateway, fake)
    fake.script(name, scripts.error(500, "the GPU caught fire"))
    failed = chat_cli(gateway, name, "-m", "hi")
    assert failed.returncode == 1
    assert "the GPU caught fire" in failed.stderr

    down = chat_cli(gateway, name, "-m", "hi", url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert "chatgate is not answering" in down.stderr and "chatgate serve" in down.stderr

    refused = gateway.cli("chat", name, "-m", "hi", "--url", gateway.url, "--token", "cg-not-a-token")
    assert refused.returncode == 1
    assert "token was refused" in refused.stderr

    for result in (missing, failed, down, refused):
        assert "Traceback" not in result.stderr


def test_slash_commands_change_what_the_next_request_carries(
    gateway: ChatgateServer, fake: FakeUpstream, terminal: list[pexpect.spawn], tmp_path: Path
) -> None:
    name, other = registered(gateway, fake), registered(gateway, fake)
    fake.script(name, [scripts.stream("First."), scripts.stream("Again.")])
    fake.script(other, scripts.stream("From the other."))
    chat = spawn(terminal, gateway, tmp_path, name)

    chat.sendline("/temperature 0.25")
    chat.expect_exact(PROMPT)
    chat.sendline("question one")
    chat.expect("First.")
    chat.expect_exact(PROMPT)
    chat.sendline("/retry")
    chat.expect("Again.")
    chat.expect_exact(PROMPT)
    chat.sendline("/clear")
    chat.expect("Conversation cleared")
    chat.sendline(f"/model {other}")
    chat.expect(f"Now chatting with {other}")
    chat.expect_exact(PROMPT)
    chat.sendline("question two")
    chat.expect("From the other.")
    chat.expect_exact(PROMPT)
    chat.sendline("/help")
    chat.expect("/save FILE")
    chat.sendline("/nonsense")
    chat.expect("Unknown command /nonsense")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)

    first, retried = fake.wait_for_requests(name, 2)
    assert first["body"]["temperature"] == 0.25
    assert first["body"]["messages"] == retried["body"]["messages"] == [{"role": "user", "content": "question one"}]
    (switched,) = fake.requests(other)
    assert switched["body"]["messages"] == [{"role": "user", "content": "question two"}]  # cleared
    assert switched["body"]["model"] == other and switched["body"]["temperature"] == 0.25


def test_without_a_model_the_chat_offers_a_pick(
    gateway: ChatgateServer, fake: FakeUpstream, terminal: list[pexpect.spawn], tmp_path: Path
) -> None:
    name = registered(gateway, fake)
    fake.script(name, scripts.stream("Picked."))
    env = {**gateway.env, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "NO_COLOR": "1"}
    argv = ["-m", "chatgate", "chat", "--url", gateway.url, "--token", gateway.admin_token]
    chat = pexpect.spawn(
        sys.executable, [*argv, "--history", str(tmp_path / "h")], env=env, encoding="utf-8", timeout=30
    )
    terminal.append(chat)
    chat.expect(name)  # listed
    chat.expect_exact("Model (number or name): ")
    chat.sendline(name)
    chat.expect(f"Chatting with {name}")
    chat.expect_exact(PROMPT)
    chat.sendline("hi")
    chat.expect("Picked.")
    chat.expect_exact(PROMPT)
    chat.sendeof()
    chat.expect(pexpect.EOF)


def test_an_error_is_said_in_plain_words_and_the_chat_goes_on(
    gateway: ChatgateServer, fake: FakeUpstream, terminal: list[pexpect.spawn], tmp_path: Path
) -> None:
    name = registered(gateway, fake)
    fake.script(name, [scripts.error(500, "the GPU caught fire"), scripts.stream("Better now.")])
    chat = spawn(terminal, gateway, tmp_path, name)

    chat.sendline("hello")
    chat.expect("error: the model server failed")
    chat.expect("the GPU caught fire")
    chat.expect_exact(PROMPT)
    chat.sendline("/retry")
    chat.expect("Better now.")
    chat.expect_exact(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    assert "Traceback" not in chat.before
    second = fake.wait_for_requests(name, 2)[1]
    assert second["body"]["messages"] == [{"role": "user", "content": "hello"}]
