"""The custom route's reading of upstream reads, timed in this process (no servers).

    python -m bench.parsing [--number N]

A 32-delta completion, as the bench upstream writes it, read two ways: through the SSE decoder
(every event cut out, then one JSON array parse) and the way the relay reads it now (a read of
whole one-line events turned into one JSON array directly, `sse.data_array`). Each way is timed
on the whole stream in one read and on one read per event (a model that writes token by token).
Prints microseconds per completion, the best of five rounds.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from bench import payload
from chatgate.api.chat_custom import _read_texts, _texts
from chatgate.trace import ChatTrace
from chatgate.upstream.sse import SSEDecoder

Reader = Callable[[bytes, SSEDecoder, ChatTrace], tuple[list[str], bool]]


def through_decoder(chunk: bytes, decoder: SSEDecoder, trace: ChatTrace) -> tuple[list[str], bool]:
    return _texts(decoder.feed_data(chunk), trace)


def completion(reads: list[bytes], read: Reader) -> str:
    decoder, trace, texts = SSEDecoder(), ChatTrace(), []
    for chunk in reads:
        got, _finished = read(chunk, decoder, trace)
        texts.extend(got)
    return "".join(texts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.parsing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--number", type=int, default=5000, help="completions per round")
    n = ap.parse_args(argv).number
    events = [payload.sse_event(text, first=i == 0) for i, text in enumerate(payload.chunk_texts(32))]
    events += [payload.sse_event(None, finish=True), payload.DONE_EVENT]
    shapes = {"one read": [b"".join(events)], "a read per event": events}
    readers: dict[str, Reader] = {"SSE decoder": through_decoder, "whole-read array": _read_texts}
    print(f"{'reads':18} {'reader':18} {'us per completion':>18}")
    for shape, reads in shapes.items():
        expected = completion(reads, through_decoder)
        for name, reader in readers.items():
            assert completion(reads, reader) == expected
            best = min(timeit.repeat(lambda r=reads, f=reader: completion(r, f), number=n, repeat=5)) / n  # type: ignore[misc]
            print(f"{shape:18} {name:18} {best * 1e6:18.1f}")


if __name__ == "__main__":
    main()
