"""Split a completion into reasoning and answer while it streams, with exactly `parse_completion`'s result.

A thinking completion reads `reasoning</think>answer` (the prompt already ends with `<think>`). Text
arrives in arbitrary pieces, so `</think>` may be split across them. The splitter keeps the whole text
and, after every piece, works out how much of each part is already certain: it holds back a tail that
could still grow into `</think>` (or into EOS), a beginning that could still grow into `<think>`, and
the whitespace `parse_completion` strips from either end of each part. So the concatenated reasoning
deltas and answer deltas equal `parse_completion(text, thinking=True)`.

With thinking=False (the prompt ends with `</think>`) the text is the answer, unless the model reasons
anyway and writes a `</think>` itself: then what precedes it is reasoning, as with thinking on, and never
reaches the answer. Until a `</think>` shows up or the text is complete, the text could still turn out to
be reasoning, so nothing is emitted; the deltas equal `parse_completion(text, thinking=False)`.

strip_answer=False (the server's): the answer keeps its whitespace, as vLLM's reasoning parsers do; only a
trailing EOS is held back. The deltas then equal `parse_completion(text, thinking, strip_answer=False)`.
"""

from __future__ import annotations

from ..tokenizer import END_THINK, EOS, THINK, parse_completion


def _held_suffix(text: str, token: str, whole: bool = False) -> int:
    """Length of the longest suffix of text that is a proper prefix of token (or token itself if whole)."""
    for k in range(min(len(token) - (0 if whole else 1), len(text)), 0, -1):
        if text.endswith(token[:k]):
            return k
    return 0


def _certain_part(text: str, strip_think: bool) -> str:
    """The certain beginning of a part that may still grow: stripped at both ends, a trailing EOS (or a
    beginning of it) held back, and with strip_think a leading `<think>` dropped (nothing while undecided)."""
    text = text.lstrip()
    body = text.rstrip()
    body = body[: len(body) - _held_suffix(body, EOS, whole=True)]
    if strip_think:
        if len(body) < len(THINK) and THINK.startswith(body):
            return ""  # may still become "<think>"
        if body.startswith(THINK):
            body = body[len(THINK):].lstrip()
    return body.rstrip()


class ReasoningSplitter:
    """feed(delta) -> (reasoning_delta, answer_delta); finish() -> the rest, once the text is complete."""

    def __init__(self, thinking: bool, strip_answer: bool = True):
        self.thinking = thinking
        self.strip_answer = strip_answer
        self.text = ""
        self.reasoning = ""  # emitted so far
        self.answer = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        return self._advance(*self._certain())

    def finish(self) -> tuple[str, str]:
        return self._advance(*parse_completion(self.text, thinking=self.thinking, strip_answer=self.strip_answer))

    def _certain(self) -> tuple[str, str]:
        cut = self.text.find(END_THINK)
        if cut >= 0:
            reasoning = parse_completion(self.text[:cut] + END_THINK, thinking=True)[0]
            answer = self.text[cut + len(END_THINK):]
            if not self.strip_answer:  # as it is, less a tail that could still become the final EOS
                return reasoning, answer[: len(answer) - _held_suffix(answer, EOS, whole=True)]
            return reasoning, _certain_part(answer, strip_think=False)
        if not self.thinking:  # may still be reasoning, if a </think> comes: held until it does or the end
            return "", ""
        # a </think> may be starting at the end: everything before such a tail is reasoning
        open_part = self.text[: len(self.text) - _held_suffix(self.text, END_THINK)]
        return _certain_part(open_part, strip_think=True), ""

    def _advance(self, reasoning: str, answer: str) -> tuple[str, str]:
        assert reasoning.startswith(self.reasoning) and answer.startswith(self.answer), "emitted text was not final"
        dr, da = reasoning[len(self.reasoning):], answer[len(self.answer):]
        self.reasoning, self.answer = reasoning, answer
        return dr, da
