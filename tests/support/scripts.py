"""Scripts: how a test tells the fake upstream to answer the requests for one model name.

A script is JSON::

    {"status": 200, "headers": {"x-a": "b"}, "framing": "chunked", "steps": [...]}

All keys are optional. `framing` is "chunked" (default, like real servers: each step is its own
chunk and its own write), "close" (no length; the body ends when the fake closes the connection)
or "raw" (no status line or headers at all: the steps write every byte, then the connection closes).
`answer_model` is the `model` name the answer's chunks carry (default: the requested one), as
OpenAI answers an alias with a dated name.

Each step is an object with exactly one of these keys:

    {"headers": true}              write the status line and headers here; without this step they
                                   go before the first step other than hang_before_headers, cut,
                                   close, informational
    {"informational": 103}         an interim 1xx response (with a Link header), then 0.1 s before
                                   anything else (the real head comes in another read)
    {"send": "text"}               these UTF-8 bytes, as-is (CR, LF, CRLF, ": ping\\n\\n", ...)
    {"send_hex": "c3"}             these raw bytes (split UTF-8, invalid bytes)
    {"flood": ["x", 52428800]}     this text repeated to that many bytes, in 64 KiB writes (a server
                                   that never ends an event; the script stays small)
    {"delta": "text"}              data: event with a content delta chunk
    {"role": "assistant"}          data: event with a role-only chunk
    {"finish": "stop"}             data: event with an empty delta and this finish_reason
    {"usage": true | {...}}        data: event with choices [] and this usage (true: default counts)
    {"event": <any JSON>}          data: event carrying this JSON
    {"done": true}                 data: [DONE]
    {"sleep": 0.5}                 pause this many seconds
    {"wait": "gate"}               block until a test calls POST /_release/gate
    {"hang": true}                 never write again; keep the connection open
    {"hang_before_headers": true}  the same, named for its use as the first step: no status line
    {"cut": true}                  abort the TCP connection (RST) at once
    {"close": true}                close the connection cleanly (FIN) without ending the body
    {"body": "text" | <JSON>}      a whole non-streamed body with Content-Length (sent with headers)

A script with a `body` step is a non-streamed answer: it may hold sleep, wait, hang, cut and close
steps but no streaming steps. Posting a list of scripts makes a sequence: the Nth request for
the name follows the Nth script, and the last one repeats.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from tests.support import openai_shapes as shapes

Step = dict[str, Any]

STREAM_STEPS = frozenset({"headers", "send", "send_hex", "flood", "delta", "role", "finish", "usage", "event", "done"})
CONTROL_STEPS = frozenset({"sleep", "wait", "hang", "hang_before_headers", "cut", "close", "informational"})
STEP_KINDS = STREAM_STEPS | CONTROL_STEPS | {"body"}


class Script(TypedDict, total=False):
    status: int
    headers: dict[str, str]
    framing: Literal["chunked", "close", "raw"]
    steps: list[Step]


class ScriptError(ValueError):
    """A script the fake upstream cannot follow."""


def step_kind(step: Step) -> str:
    """The one key that names what a step does."""
    if not isinstance(step, dict) or len(step) != 1:
        raise ScriptError(f"a step is an object with exactly one key, not {step!r}")
    (kind,) = step
    if kind not in STEP_KINDS:
        raise ScriptError(f"unknown step {kind!r}")
    return kind


def validate(script: Any) -> Script:
    """Check one script and return it; raises ScriptError with the reason."""
    if not isinstance(script, dict):
        raise ScriptError("a script is a JSON object")
    unknown = set(script) - {"status", "headers", "framing", "steps", "answer_model"}
    if unknown:
        raise ScriptError(f"unknown script keys {sorted(unknown)}")
    if not isinstance(script.get("answer_model", ""), str):
        raise ScriptError("answer_model is the model name the chunks carry, a string")
    if not isinstance(script.get("status", 200), int):
        raise ScriptError("status must be an integer")
    headers = script.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ScriptError("headers must map names to strings")
    framing = script.get("framing", "chunked")
    if framing not in ("chunked", "close", "raw"):
        raise ScriptError(f"unknown framing {framing!r}")
    steps = script.get("steps", [])
    if not isinstance(steps, list):
        raise ScriptError("steps must be a list")
    kinds = {step_kind(step) for step in steps}
    for step in steps:
        if "send_hex" in step:
            bytes.fromhex(step["send_hex"])  # ValueError is reported like a ScriptError
        if "informational" in step and step["informational"] not in range(100, 200):
            raise ScriptError("informational takes a 1xx status")
    if "body" in kinds and kinds & STREAM_STEPS:
        raise ScriptError("a body script cannot also stream")
    if framing == "raw" and kinds & {"headers", "body"}:
        raise ScriptError("raw framing writes no headers and no body of its own")
    return script  # type: ignore[return-value]


def stream(*deltas: str, role: bool = True, done: bool = True, status: int = 200) -> Script:
    """A well-formed stream of these content deltas."""
    steps: list[Step] = [{"role": "assistant"}] if role else []
    steps += [{"delta": text} for text in deltas]
    steps.append({"finish": "stop"})
    if done:
        steps.append({"done": True})
    return {"status": status, "steps": steps}


def error(status: int, message: str, *, code: str | None = None) -> Script:
    """A non-streamed OpenAI-shaped error answer."""
    return {"status": status, "steps": [{"body": shapes.error(message, code=code)}]}


def body(status: int, content: str | dict[str, Any], headers: dict[str, str] | None = None) -> Script:
    """A non-streamed answer with this body (text as-is, anything else as JSON)."""
    return {"status": status, "headers": headers or {}, "steps": [{"body": content}]}


# The ways a model server fails before its answer's first text, by name (failover tests). A
# refused connection is not a script: it is a port nothing listens on (`procs.refused_base_url`);
# a dead host that never answers a SYN is `procs.Blackhole`.
def failure(mode: str, *, retry_after: str = "0") -> Script:
    """A script that fails in this way: hang_before_head, stall_before_first_token, status_429
    (with `Retry-After: retry_after`), status_503, status_500, reset_before_head, cut_before_text."""
    scripts: dict[str, Script] = {
        "hang_before_head": {"steps": [{"hang_before_headers": True}]},
        "stall_before_first_token": {"steps": [{"role": "assistant"}, {"send": ": ping\n\n"}, {"hang": True}]},
        "status_429": {
            "status": 429,
            "headers": {"retry-after": retry_after},
            "steps": [{"body": shapes.error("Rate limit reached", code="rate_limit_exceeded")}],
        },
        "status_503": error(503, "The server is overloaded"),
        "status_500": error(500, "Internal error"),
        "reset_before_head": {"steps": [{"cut": True}]},
        "cut_before_text": {"steps": [{"role": "assistant"}, {"cut": True}]},
    }
    return scripts[mode]


def cut_after(*deltas: str) -> Script:
    """A stream that sends these deltas, then is reset mid-answer (no finish, no [DONE])."""
    return {"steps": [{"role": "assistant"}, *({"delta": text} for text in deltas), {"cut": True}]}
