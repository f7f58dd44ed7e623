"""A conversation as the text a word model continues: the chat template.

The model has no notion of turns; a conversation is rendered to plain text, the assistant's
turn is opened, and the reply is what the model writes up to the next turn marker::

    You are a poet.          <- system (or developer) messages, each a paragraph

    User: Write about the sea.
    Assistant: The sea is ...
    User: And the moon?
    Assistant:               <- the model continues here; its reply stops at "\\nUser:"

`TEMPLATE` describes it for ``GET /info`` and the model cards: the strings `render` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]

# Each message's text by its role, the assistant's opening, and where a reply ends.
FORMATS: dict[Role, str] = {
    "system": "{content}\n\n",
    "user": "User: {content}\n",
    "assistant": "Assistant: {content}\n",
}
REPLY_OPENS = "Assistant:"
TURN_MARKER = "\nUser:"
TEMPLATE = {**FORMATS, "reply_starts_with": REPLY_OPENS, "reply_stops_at": TURN_MARKER}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


def render(messages: Sequence[Message]) -> str:
    """The text of ``messages`` with the assistant's turn opened, for the model to continue."""
    parts = [
        # One line each: a newline inside a message would end its turn.
        FORMATS[m.role].format(content=" ".join(m.content.split()))
        for m in messages
    ]
    return "".join(parts) + REPLY_OPENS
