"""A conversation as the text a word model continues: the chat template.

The model has no notion of turns; a conversation is rendered to plain text, the assistant's
turn is opened, and the reply is what the model writes up to the next turn marker::

    You are a poet.          <- system (or developer) messages, each a paragraph

    User: Write about the sea.
    Assistant: The sea is ...
    User: And the moon?
    Assistant:               <- the model continues here; its reply stops at "\\nUser:"

`TEMPLATE` describes it for ``GET /info`` and the model cards, from the same strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]

SPEAKERS = {"user": "User", "assistant": "Assistant"}
TURN_MARKER = "\nUser:"  # where a reply ends: the next turn
TEMPLATE = {
    "system": "{content}\\n\\n",
    "user": "User: {content}\\n",
    "assistant": "Assistant: {content}\\n",
    "reply_starts_with": "Assistant:",
    "reply_stops_at": TURN_MARKER.replace("\n", "\\n"),
}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


def render(messages: Sequence[Message]) -> str:
    """The text of ``messages`` with the assistant's turn opened, for the model to continue."""
    parts = []
    for message in messages:
        content = " ".join(message.content.split())  # one line: a newline would end the turn
        if message.role == "system":
            parts.append(f"{content}\n\n")
        else:
            parts.append(f"{SPEAKERS[message.role]}: {content}\n")
    return "".join(parts) + "Assistant:"
