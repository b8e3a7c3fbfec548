"""The web console in a real headless Chromium, against a real chatgate and the fake upstream:
sign in, models, a streamed chat and its Stop, errors, untrusted Markdown, usage charts, admin,
sign out. Each page is also photographed at desktop and phone width (into docs/console/ with
`make screenshots`)."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from playwright.sync_api import Page, expect
from tests.console.conftest import DESKTOP, PHONE
from tests.support import ChatgateServer, FakeUpstream, scripts, unique_name

from chatgate.store.schema import usage as usage_table

pytestmark = pytest.mark.e2e

# The README's screenshots are rewritten only when asked (`make screenshots`): a test run leaves
# the work tree as it found it. Otherwise they go to a scratch folder, and are still taken.
SHOTS = Path(os.environ.get("CHATGATE_SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "chatgate-console-shots")


def shoot(page: Page, name: str, *, hide: str | None = None) -> None:
    """<name>-desktop.png and -phone.png (the README shows them, from docs/console/); `hide` masks
    what matches it (a token, even a throwaway one, stays out of the repository)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    mask = [page.locator(hide)] if hide else []
    page.screenshot(path=str(SHOTS / f"{name}-desktop.png"), mask=mask)
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(SHOTS / f"{name}-phone.png"), full_page=True, mask=mask)
    page.set_viewport_size(DESKTOP)


def sign_in(page: Page, server: ChatgateServer, token: str | None = None) -> None:
    page.goto(server.url + "/#/chat")
    page.fill("#token", token or server.admin_token)
    page.click("form.sign-in button[type=submit]")
    expect(page.locator("header.top")).to_be_visible()


def add_model(server: ChatgateServer, fake: FakeUpstream, script: Any, **fields: Any) -> tuple[str, str]:
    name = unique_name("console")
    fake.script(name, script)
    return server.add_model(base_url=fake.base_url, model_id=name, name=name, **fields), name


def open_chat(page: Page, model_id: str) -> None:
    page.goto(page.url.split("#")[0] + "#/chat")
    expect(page.locator("#chat-model")).to_have_attribute("data-loaded", "true")
    page.select_option("#chat-model", model_id)


def ask(page: Page, text: str) -> Any:
    page.fill("#chat-prompt", text)
    page.keyboard.press("Enter")
    return page.locator(".message.assistant").last


def page_watch(page: Page) -> dict[str, Any]:
    return page.evaluate("({violations: window.__violations, errors: window.__errors, pwned: window.__pwned})")


def test_sign_in_keeps_no_token_in_the_page_and_sign_out_ends_the_session(
    page: Page, console_server: ChatgateServer
) -> None:
    page.goto(console_server.url + "/")
    expect(page.locator("form.sign-in")).to_be_visible()
    shoot(page, "sign-in")

    page.fill("#token", "cg_not-a-real-token")
    page.click("form.sign-in button[type=submit]")
    expect(page.get_by_role("alert")).to_have_text("API token is invalid or revoked")

    sign_in(page, console_server)
    expect(page.locator("header .who")).to_have_text("admin (admin)")
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["chatgate_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict" and not session["secure"]  # plain HTTP here
    # Nothing a script can read holds a credential: not the cookie, not storage, not the field.
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert console_server.admin_token not in page.content()

    jar = {"Cookie": f"chatgate_session={session['value']}"}
    assert httpx.get(console_server.url + "/api/session", headers=jar, trust_env=False).status_code == 200
    page.click("header button.sign-out")
    expect(page.locator("form.sign-in")).to_be_visible()
    assert "chatgate_session" not in {c["name"] for c in page.context.cookies()}
    # Ended on the server: a copy of the cookie is worth nothing now.
    assert httpx.get(console_server.url + "/api/session", headers=jar, trust_env=False).status_code == 401
    assert page_watch(page)["violations"] == []


def test_add_edit_and_test_a_model_from_the_models_page(
    page: Page, console_server: ChatgateServer, fake: FakeUpstream
) -> None:
    name = unique_name("added")
    fake.script(name, scripts.body(200, {"choices": [{"message": {"role": "assistant", "content": "OK"}}]}))
    sign_in(page, console_server)
    page.click("nav >> text=Models")
    page.click("button.add-model")
    page.fill("#model-name", name)
    page.fill("#model-base_url", fake.base_url)
    page.fill("#model-model_id", name)
    page.fill("#model-api_key", "sk-console-secret-9876")
    page.click("form.model-form button[type=submit]")

    card = page.locator("article.model", has_text=name)
    expect(card).to_be_visible()
    expect(card).to_contain_text("sk-…9876")  # masked once saved: write-only
    assert "sk-console-secret-9876" not in page.content()

    card.locator("button.test").click()
    expect(card.locator(".verdict")).to_have_class(re.compile(r"\bok\b"))
    expect(card.locator(".verdict")).to_contain_text("ms")
    # The check reached the fake upstream with the model's real key.
    assert fake.wait_for_requests(name)[0]["headers"]["authorization"] == "Bearer sk-console-secret-9876"

    card.locator("button.edit").click()
    expect(page.locator("#model-api_key")).to_have_value("")  # the key is never sent back to the page
    page.select_option("#model-sharing", "public")
    page.click("form.model-form button[type=submit]")
    expect(card.locator(".badge")).to_have_text("public")
    shoot(page, "models")
    assert page_watch(page)["violations"] == []

    with console_server.client() as client:
        (model,) = [m for m in client.get("/api/models").json()["data"] if m["name"] == name]
    assert model["sharing"] == "public" and model["api_key"] == "sk-…9876"  # an edit without a key keeps it


def test_the_answer_streams_in_before_it_is_complete(
    page: Page, console_server: ChatgateServer, fake: FakeUpstream
) -> None:
    gate = unique_name("gate")
    script = {
        "steps": [
            {"role": "assistant"},
            {"delta": "First **chunk**"},
            {"wait": gate},
            {"delta": "\n\n```python\nprint('second')\n```"},
            {"finish": "stop"},
            {"done": True},
        ]
    }
    model_id, _name = add_model(console_server, fake, script)
    sign_in(page, console_server)
    open_chat(page, model_id)
    answer = ask(page, "Say something in two parts")

    # The first chunk is on the page while the upstream still holds the rest at the gate.
    expect(answer.locator(".content strong")).to_have_text("chunk")
    expect(answer).to_have_attribute("data-state", "streaming")
    fake.wait_for_gate(gate)
    assert fake.gates()["waiting"][gate] == 1
    expect(page.locator("button.stop")).to_be_visible()

    fake.release(gate)
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator("pre code.hljs")).to_contain_text("print('second')")  # highlighted
    expect(answer.locator("pre code .hljs-string")).to_have_text("'second'")
    expect(page.locator("button.regenerate")).to_be_visible()
    shoot(page, "chat")
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(SHOTS / "chat-dark-desktop.png"))
    assert page_watch(page)["violations"] == []


PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c"
    "63f8cfc0f01f0005000201a5f9d5a40000000049454e44ae426082"
)


def test_system_prompt_temperature_image_and_regenerate_reach_the_model(
    page: Page, console_server: ChatgateServer, fake: FakeUpstream
) -> None:
    model_id, name = add_model(console_server, fake, [scripts.stream("One answer"), scripts.stream("Another answer")])
    sign_in(page, console_server)
    open_chat(page, model_id)
    page.click("summary")
    page.fill("#chat-system", "Answer in French.")
    page.fill("#chat-temperature", "0.3")
    page.set_input_files("#chat-image", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": PNG}])
    expect(page.locator(".composer .thumbs img")).to_have_count(1)
    answer = ask(page, "What is this?")
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer).to_contain_text("One answer")

    page.click("button.regenerate")
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(page.locator(".message.assistant")).to_contain_text("Another answer")

    first, second = fake.wait_for_requests(name, 2)
    for request in (first, second):  # the same question both times: the first answer replaced
        body = request["body"]
        assert body["temperature"] == 0.3 and body["stream"] is True
        system, user = body["messages"]
        assert system == {"role": "system", "content": "Answer in French."}
        text, image = user["content"]
        assert text == {"type": "text", "text": "What is this?"}
        assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")


def test_stop_closes_the_upstream_connection(page: Page, console_server: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, name = add_model(
        console_server, fake, {"steps": [{"role": "assistant"}, {"delta": "This will go on"}, {"hang": True}]}
    )
    sign_in(page, console_server)
    open_chat(page, model_id)
    answer = ask(page, "Talk forever")
    expect(answer.locator(".content")).to_have_text("This will go on")
    (connection,) = fake.connections(name)
    assert connection["closed"] is None  # still streaming

    page.click("button.stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    # Stop dropped the browser's request; chatgate then closed its upstream connection.
    (closed,) = fake.wait_for_closed(name, timeout=10)
    assert closed["closed_by"] == "peer"
    expect(page.locator("button.send")).to_be_enabled()


def test_an_upstream_error_is_shown_in_plain_words(
    page: Page, console_server: ChatgateServer, fake: FakeUpstream
) -> None:
    model_id, _name = add_model(console_server, fake, scripts.error(503, "The model is still loading"))
    sign_in(page, console_server)
    open_chat(page, model_id)
    ask(page, "Hello?")
    expect(page.get_by_role("alert")).to_have_text("The model is still loading")
    expect(page.locator(".message.assistant")).to_have_count(0)  # no empty answer left behind


def test_an_error_in_the_middle_of_a_stream_is_shown_below_what_arrived(
    page: Page, console_server: ChatgateServer, fake: FakeUpstream
) -> None:
    script = {
        "steps": [
            {"role": "assistant"},
            {"delta": "Half an answer"},
            {"event": {"error": {"message": "The server is overloaded", "type": "server_error"}}},
        ]
    }
    model_id, _name = add_model(console_server, fake, script)
    sign_in(page, console_server)
    open_chat(page, model_id)
    answer = ask(page, "Tell me everything")
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".content")).to_have_text("Half an answer")
    expect(page.get_by_role("alert")).to_have_text("The server is overloaded")


XSS_ANSWER = (
    'Look: <img src="x" onerror="window.__pwned = \'img\'"> and '
    "[click me](javascript:window.__pwned='link') and "
    "<script>window.__pwned = 'script'</script>"
    "<a href=\"javascript:window.__pwned='raw-link'\">raw link</a>"
)


def test_model_output_cannot_run_script(page: Page, console_server: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, _name = add_model(console_server, fake, scripts.stream(XSS_ANSWER))
    sign_in(page, console_server)
    open_chat(page, model_id)
    answer = ask(page, "Be nasty")
    expect(answer).to_have_attribute("data-state", "done")

    content = answer.locator(".content")
    expect(content).to_contain_text("click me")
    assert content.locator("script").count() == 0
    img = content.locator("img")
    assert img.count() == 1 and img.get_attribute("onerror") is None
    for link in content.locator("a").all():
        assert not (link.get_attribute("href") or "").lower().startswith("javascript:")
        link.click()
    assert answer.locator("[onerror], [onclick], [onload]").count() == 0
    watch = page_watch(page)
    assert watch["pwned"] is None
    assert watch["errors"] == []
    # Chromium reports an inline handler attribute as it parses one, even into the sanitizer's
    # inert document (script-src-attr; see the control below): those are expected. Nothing else
    # may have been refused, a script element or a javascript: navigation least of all.
    assert [v for v in watch["violations"] if v["directive"] != "script-src-attr"] == []


def test_the_xss_detector_detects(page: Page, console_server: ChatgateServer) -> None:
    """The control for the test above: the same answer put into the page without the sanitizer
    is caught by the CSP, and the hook records it, so a clean record there means something."""
    page.goto(console_server.url + "/")
    expect(page.locator("form.sign-in")).to_be_visible()
    page.evaluate(
        "(html) => { const d = document.createElement('div'); d.id = 'raw'; d.innerHTML = html;"
        " document.body.append(d); }",
        XSS_ANSWER,
    )
    page.click("#raw a[href^='javascript:']")
    page.wait_for_function("window.__violations.some((v) => v.directive !== 'script-src-attr')")
    watch = page_watch(page)
    assert watch["pwned"] is None  # the CSP held even without the sanitizer
    directives = {v["directive"] for v in watch["violations"]}
    assert "script-src-attr" in directives  # the onerror handler, refused
    assert directives - {"script-src-attr"}  # the javascript: navigation, refused


def seed_usage(server: ChatgateServer, model_id: str, per_day: dict[int, int]) -> None:
    """Usage rows on past days (days ago -> chats), as chatgate would have recorded them."""
    engine = sa.create_engine(f"sqlite:///{server.data_dir / 'chatgate.db'}")
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    try:
        with engine.begin() as conn:
            for days_ago, count in per_day.items():
                for i in range(count):
                    conn.execute(
                        usage_table.insert().values(
                            request_id=uuid.uuid4().hex,
                            endpoint="/v1/chat/completions",
                            model_id=uuid.UUID(model_id),
                            user_id=None,
                            started_at=today - timedelta(days=days_ago, minutes=i),
                            status=500 if i == 0 else 200,
                            ttfb=0.1 * (i + 1),
                            duration=1.0,
                            prompt_tokens=10,
                            completion_tokens=5,
                            bytes_out=100,
                            client_gone=False,
                            error=None,
                        )
                    )
    finally:
        engine.dispose()


def test_usage_charts_have_a_point_per_day(page: Page, console_server: ChatgateServer, fake: FakeUpstream) -> None:
    model_id, name = add_model(console_server, fake, scripts.stream("ok"))
    seeded = {9: 2, 5: 4, 2: 3}
    seed_usage(console_server, model_id, seeded)
    with console_server.client() as client:
        since = (datetime.now(UTC) - timedelta(days=30)).isoformat()
        summary = client.get("/api/usage/summary", params={"since": since}).json()["data"]
    days = sorted({row["day"] for row in summary})
    today = datetime.now(UTC).date()
    expected = [seeded.get((today - datetime.fromisoformat(day).date()).days, 0) for day in days]
    assert sum(expected) == 9

    sign_in(page, console_server)
    page.click("nav >> text=Usage")
    expect(page.locator("#chart-requests")).to_be_visible()
    chart = page.evaluate(
        """(name) => {
            const chart = Chart.getChart(document.getElementById('chart-requests'));
            const set = chart.data.datasets.find((d) => d.label === name);
            const meta = chart.getDatasetMeta(chart.data.datasets.indexOf(set));
            return {labels: chart.data.labels, data: set.data, drawn: meta.data.length};
        }""",
        name,
    )
    assert chart["labels"] == days
    assert chart["data"] == expected
    assert chart["drawn"] == len(days)  # one bar drawn per day
    errors = page.evaluate("Chart.getChart(document.getElementById('chart-errors')).data.datasets[0].data.length")
    assert errors == len(days)
    expect(page.locator(".usage table tbody tr", has_text=name)).to_have_count(3)
    assert page_watch(page)["violations"] == []  # Chart.js draws under the strict CSP
    shoot(page, "usage")


def test_admin_creates_a_user_and_a_token_shown_once_then_revokes_it(
    page: Page, console_server: ChatgateServer
) -> None:
    user = unique_name("person")
    sign_in(page, console_server)
    page.click("nav >> text=Admin")
    page.fill("#user-name", user)
    page.click("form.inline >> text=Add user")
    expect(page.locator(".admin table", has_text=user).first).to_be_visible()
    page.select_option("#token-user", user)
    page.click("form.inline >> text=Create token")
    token = page.locator("#new-token").input_value()
    assert token.startswith("cg_")
    with httpx.Client(base_url=console_server.url, headers={"Authorization": f"Bearer {token}"}, trust_env=False) as c:
        assert c.get("/api/session").json()["name"] == user
    shoot(page, "admin", hide="#new-token")

    page.on("dialog", lambda dialog: dialog.accept())
    row = page.locator("tr", has_text=token[:10])
    row.locator("button.revoke").click()
    expect(row).to_contain_text("revoked")
    assert (
        httpx.get(
            console_server.url + "/api/session", headers={"Authorization": f"Bearer {token}"}, trust_env=False
        ).status_code
        == 401
    )
    # The token is in no page but the one that created it.
    page.reload()
    expect(page.locator(".admin table", has_text=user).first).to_be_visible()
    assert token not in page.content()
