"""How likely a text is under a model: per-token log-probabilities and bits per character.

One implementation for the server's ``/score``, the ``training.evaluate`` command and the
quality benchmark, so that their figures agree. Bits per character count every character
of the text, whatever the tokens (an ``<unk>`` costs whatever probability the model gives
it), which makes it the one figure that compares a word model with a subword one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from model_store.cache import TextCache, mix_rows, mixed_log_probs
from model_store.network import Hidden, WordRNN, hidden_select, top_features
from model_store.sampling import advance
from model_store.subword import NEWLINE
from model_store.vocab import Vocab

MAX_WORD_PIECES = 6  # how deep the next-word search spells a word
WINDOW = 2048  # tokens per forward pass: the state is carried, memory stays bounded
CHUNK = 256  # positions per output-layer call: bounds the (T, V) tensor


def token_log_probs(model: WordRNN, vocab: Vocab, ids: Sequence[int]) -> Tensor:
    """(T,) natural log-probability of each id given ``<bos>`` and the ids before it, on the
    CPU: the network's, with the model's text cache mixed in (`model_store.cache`)."""
    device = model.embedding.weight.device
    inputs = torch.tensor([vocab.bos_id, *ids[:-1]], dtype=torch.long, device=device)
    targets = torch.tensor(list(ids), dtype=torch.long, device=device)
    out: list[Tensor] = []
    hidden = None
    with torch.inference_mode():
        for start in range(0, len(ids), WINDOW):
            features, hidden = model.features(inputs[start : start + WINDOW].unsqueeze(0), hidden)
            for c in range(0, features.shape[1], CHUNK):
                chunk = features[0, c : c + CHUNK]
                part = targets[start + c : start + c + chunk.shape[0]]
                out.append(model.target_log_probs(chunk, part))
    own = torch.cat(out).cpu() if out else torch.zeros(0)
    return mixed_log_probs(model.config.cache, ids, own, vocab.starts_word()).to(own.dtype)


def bits_per_char(log_prob: float, characters: int) -> float:
    """Bits per character of a text whose tokens have the total natural ``log_prob``."""
    return -log_prob / math.log(2) / characters if characters else math.nan


def next_words(
    model: WordRNN,
    vocab: Vocab,
    hidden: Hidden,
    top_k: int,
    beam: int = 0,
    history: Sequence[int] = (),
) -> list[tuple[str, float]]:
    """The ``top_k`` likeliest next words after the state ``hidden`` (one row), best first;
    ``history`` holds the ids of the text so far, for the model's text cache.

    For a word vocabulary these are tokens. For a ``subword`` one a word is a start piece and
    its continuations up to the next start piece, so a short beam search over pieces finds
    them: a word's probability is the product of its pieces' and of the next piece starting
    a new word. The beam (``beam`` or ``max(2 * top_k, 16)`` prefixes, at most
    ``MAX_WORD_PIECES`` pieces deep) makes the figures lower bounds of the true ones.
    """
    device = model.embedding.weight.device
    banned = torch.tensor(vocab.special_ids, device=device)
    cache = (
        TextCache(model.config.cache, history, vocab.starts_word())
        if model.config.cache.enabled
        else None
    )
    log_probs = model.log_probs(top_features(hidden))
    if cache is not None:
        log_probs = mix_rows(log_probs, [cache.next_ids()])
    log_probs = log_probs[0].index_fill(0, banned, -math.inf)
    if not vocab.is_subword:
        values, ids = log_probs.topk(min(top_k, len(vocab) - len(vocab.special_ids)))
        pairs = zip(values.tolist(), ids.tolist(), strict=True)
        return [(vocab.tokens[i], math.exp(v)) for v, i in pairs]
    starts = torch.tensor(vocab.starts_word(), device=log_probs.device)
    width = beam or max(2 * top_k, 16)
    found: dict[str, float] = {}
    newline = vocab.id_of(NEWLINE)
    found[NEWLINE] = math.exp(float(log_probs[newline]))
    first = log_probs.masked_fill(~starts, -math.inf)
    first[newline] = -math.inf
    scores, ids = first.topk(min(width, int(starts.sum())))
    beams = [([i], s) for i, s in zip(ids.tolist(), scores.tolist(), strict=True) if s > -math.inf]
    state = hidden_select(hidden, [0] * len(beams))
    for _ in range(MAX_WORD_PIECES):
        if not beams:
            break
        state = advance(model, state, [b[0][-1] for b in beams])
        step = model.log_probs(top_features(state))  # (B, V)
        if cache is not None:
            step = mix_rows(step, [cache.next_ids(after=pieces) for pieces, _ in beams])
        step = step.index_fill(1, banned, -math.inf)
        ends = step.masked_fill(~starts, -math.inf).logsumexp(1).tolist()
        for (pieces, score), end in zip(beams, ends, strict=True):
            word = vocab.spell(pieces)
            found[word] = found.get(word, 0.0) + math.exp(score + end)
        going = torch.tensor([s for _, s in beams], device=step.device).unsqueeze(1)
        more = (going + step.masked_fill(starts, -math.inf)).flatten()
        scores, flat = more.topk(min(width, more.numel()))
        best = sorted(found.values(), reverse=True)
        # A probability that underflowed to 0 sets no bar (and has no logarithm).
        bar = math.log(best[top_k - 1]) if len(best) >= top_k and best[top_k - 1] else -math.inf
        kept = [
            (int(f) // step.shape[1], int(f) % step.shape[1], s)
            for f, s in zip(flat.tolist(), scores.tolist(), strict=True)
            if s > bar  # a longer word is less likely than its prefix: it cannot enter
        ]
        state = hidden_select(state, [row for row, _, _ in kept]) if kept else state
        beams = [([*beams[row][0], piece], s) for row, piece, s in kept]
    ranked = sorted(found.items(), key=lambda item: item[1], reverse=True)
    return [(w, p) for w, p in ranked if w][:top_k]
