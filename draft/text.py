"""Token ids in, releasable text out: whole UTF-8 and stop sequences.

A stream must never show text it may have to take back. Two things could
force that: a token that ends inside a multi-byte character (the model's
``IncrementalDetokenizer`` holds those bytes back), and text that could still
become the start of a stop sequence ("\\n\\n" after a lone "\\n"). TextStream
holds back the longest tail of the text that is a prefix of some stop
string, releases the rest, and once a stop string is complete it releases
what came before it and nothing after. The decode loop uses it to stop
generation; the server uses the same texts for streaming.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] | None = None):
        self._detok = tokenizer.detokenizer()
        self.stop = [s for s in (stop or []) if s]
        self._held = ""  # decoded but not yet released
        self.text = ""  # everything released so far
        self.stopped = False
        self.stop_string: str | None = None  # which stop string ended the stream
        self.finished = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to release."""
        if self.stopped or self.finished:
            raise RuntimeError("TextStream already ended; start a new one per generation")
        return self._release(self._held + self._detok.push(token_id), final=False)

    def finish(self) -> str:
        """End of generation: release what is held (never a stop string).

        After a stop sequence nothing more comes out: the text after it is
        discarded, as is anything still undecoded.
        """
        if self.finished:
            return ""
        self.finished = True
        if self.stopped:
            return ""
        return self._release(self._held + self._detok.flush(), final=True)

    def _release(self, pending: str, final: bool) -> str:
        if self.stop:
            cut, which = -1, None
            for s in self.stop:
                i = pending.find(s)
                if i != -1 and (cut == -1 or i < cut):
                    cut, which = i, s
            if which is not None:
                self.stopped, self.stop_string = True, which
                self._held = ""
                return self._emit(pending[:cut])
        hold = 0 if final else self._held_tail(pending)
        self._held = pending[len(pending) - hold:] if hold else ""
        return self._emit(pending[:len(pending) - hold])

    def _held_tail(self, pending: str) -> int:
        """Length of the longest tail of ``pending`` that a stop string starts with."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, out: str) -> str:
        self.text += out
        return out
