"""The model card of ``GET /v1/models``: OpenAI's three fields, then what the model is."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from app.openai.protocol import TRAINING_FIGURES, ModelCard
from app.serving import TextService

if TYPE_CHECKING:
    from app.registry import ModelRegistry


def _timestamp(iso: object) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if isinstance(iso, str) else 0
    except ValueError:
        return 0


def model_card(service: TextService, models: ModelRegistry) -> ModelCard:
    info = service.info()
    architecture = info.architecture
    manifest = service.engine.checkpoint.manifest
    return ModelCard(
        id=models.card_id(service),
        created=_timestamp(info.created),
        name=info.name,
        version=info.model,
        loaded_at=int(info.loaded_at.timestamp()),
        default=info.name == models.default_name,
        cell=architecture["cell"],
        layers=architecture["layers"],
        embed_dim=architecture["embed_dim"],
        hidden_dim=architecture["hidden_dim"],
        vocab_size=info.vocab_size,
        parameters=info.parameters,
        best_valid_perplexity=info.best_valid_perplexity,
        training={k: manifest[k] for k in TRAINING_FIGURES if k in manifest},
        corpus=info.corpus,
        chat_template=info.chat_template,
    )
