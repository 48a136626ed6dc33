"""A thinking budget: an answer that thinks (``<think>`` ... ``</think>``, ``model/reasoning.py``)
may spend at most so many tokens inside its thinking. When it has spent them without closing it,
the engine writes the close itself, one forced token a step (every other token banned for that
row), and the model goes on with its answer. Anthropic's ``thinking.budget_tokens`` and vLLM's
``thinking_token_budget`` reach it.

The row's text says where it stands: before an answer that may open ``<think>`` has shown whether
it does, inside the thinking (counting tokens), writing the forced close, or done (closed, by the
model or the engine, or never opened). While the budget may still act, the row's next step needs
its newest token on the host (``Sequence.host_bound``): its steps do not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_worker.model.reasoning import CLOSE, OPEN

FORCED_CLOSE = f"\n{CLOSE}\n\n"  # what the engine writes when the budget is spent


@dataclass(frozen=True)
class ThinkingBudget:
    """``tokens`` thinking tokens at most; ``opened``: the prompt opened the thinking (the answer
    starts inside it); ``close``: the token ids of ``FORCED_CLOSE``, as the model's tokenizer cuts it."""

    tokens: int
    opened: bool
    close: tuple[int, ...]


class BudgetState:
    """One answer's place under its budget, moved on by each accepted token (``add``)."""

    def __init__(self, budget: ThinkingBudget) -> None:
        self.budget = budget
        self.phase = "thinking" if budget.opened else "start"  # start | thinking | closing | done
        self.spent = 0  # tokens inside the thinking
        self.forced = 0  # close tokens written so far
        self.searched = 0  # how far the text was searched for the model's own close

    @property
    def live(self) -> bool:
        """Whether the budget may still act on this answer."""
        return self.phase != "done"

    @property
    def forced_token(self) -> int | None:
        """The token the next step must produce, while the engine writes the close."""
        return self.budget.close[self.forced] if self.phase == "closing" else None

    def add(self, text: str) -> None:
        """One more token accepted; ``text``: the answer's whole text with it (as decoded)."""
        if self.phase == "closing":
            self.forced += 1
            if self.forced == len(self.budget.close):
                self.phase = "done"
            return
        if self.phase == "start":
            head = text.lstrip()
            if head.startswith(OPEN):
                self.phase, self.searched = "thinking", len(text) - len(head) + len(OPEN)
                self._closed(text)
            elif not OPEN.startswith(head):
                self.phase = "done"  # the answer does not think
            return
        self.spent += 1
        if not self._closed(text) and self.spent >= self.budget.tokens:
            self.phase = "closing"

    def _closed(self, text: str) -> bool:
        """Whether the model closed its thinking in ``text`` past what was searched (then done)."""
        if CLOSE in text[max(0, self.searched - len(CLOSE) + 1):]:
            self.phase = "done"
            return True
        self.searched = len(text)
        return False
