"""The service's logic between the routes and the engine: requests in, responses out.

`TextService` checks a request against the loaded model and the settings (each problem named
by its field), turns seed words into ids the way the model's tokenizer cuts them, runs the
work on the engine, keeps sessions up to date, and builds the responses. One service serves
one loaded version of one model; ``app/registry.py`` keeps them by name and swaps in a new one
when its run folder commits new weights.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import numpy as np

from app.chat import TEMPLATE
from app.engine import (
    Engine,
    EngineBusy,
    EngineClosed,
    Generation,
    GenerationCancelled,
    GenerationJob,
    GenerationResult,
    GenerationTimeout,
)
from app.errors import INTERNAL_ERROR, ApiError
from app.generation import (
    Failed,
    Finished,
    OnUnknown,
    Seed,
    TextEvent,
    TextRequest,
    TextResult,
    TextSample,
    TextScores,
    TextTokens,
)
from app.schemas import (
    MAX_RANDOM_SEED,
    InfoResponse,
    Limits,
    NextWordsRequest,
    NextWordsResponse,
    Served,
    SessionCreate,
    SessionPublic,
    WordProbability,
)
from app.sessions import Session, SessionStore
from app.settings import Settings
from model_store.copies import CopyIndex
from model_store.network import count_parameters, hidden_shapes, state_shapes
from model_store.sampling import SamplingParams
from model_store.vocab import Detokenizer

log = logging.getLogger("app")

T = TypeVar("T")


@dataclass(frozen=True)
class _Plan:
    """A checked generation request, ready to run."""

    job: GenerationJob
    seed: Seed
    session: Session | None
    prefix: str  # the text the seed words add (after the session's words, if any)


class RandomSeeds:
    """Random seeds for the requests that name none, from the OS's generator, drawn a block
    at a time.

    A draw per request was a system call or two on the event loop (``secrets.randbelow``),
    and a system call lets go of the GIL: under load the loop then waits for the inference
    thread to hand it back, once per call (3-7% of the loop's samples in a profile at
    concurrency 64). A block keeps the seeds as unpredictable; each service draws its own.
    """

    BLOCK = 1024

    def __init__(self) -> None:
        self._left: list[int] = []

    def __call__(self) -> int:
        if not self._left:
            block = np.frombuffer(os.urandom(8 * self.BLOCK), dtype=np.uint64)
            # MAX_RANDOM_SEED is 2**53 - 1: a mask keeps every seed equally likely.
            self._left = (block & np.uint64(MAX_RANDOM_SEED)).tolist()
        return self._left.pop()


class CopyMeter:
    """Each sample's `longest_copy`, measured together for the samples that finish together.

    The inference thread hands the event loop a round's finished requests at once; each asks
    here as it finishes, and one `CopyIndex.longest_copies` pass, run once the loop has let
    all of them ask, answers them all. Measured one sample at a time, each of a measure's
    array operations let go of the GIL, and under load the loop then waited for the
    inference thread to hand it back (the README has what that cost). A pass that fails
    measures each request alone, so that only the requests whose texts fail get the error.
    """

    def __init__(self, index: CopyIndex) -> None:
        self.index = index
        self._asked: list[tuple[list[list[str]], asyncio.Future[list[int]]]] = []

    async def measure(self, texts: list[list[str]]) -> list[int]:
        """The longest copy in each of ``texts``, once the loop's pending asks are in."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        if not self._asked:
            loop.call_soon(self._answer)
        self._asked.append((texts, future))
        return await future

    def _answer(self) -> None:
        asked = [(texts, future) for texts, future in self._asked if not future.done()]
        self._asked = []  # a done future was cancelled: its client left
        try:
            lengths = self.index.longest_copies([text for texts, _ in asked for text in texts])
        except Exception:
            for texts, future in asked:  # each alone: only the failing ones get the error
                try:
                    future.set_result(self.index.longest_copies(texts))
                except Exception as exc:
                    future.set_exception(exc)
            return
        at = 0
        for texts, future in asked:
            future.set_result(lengths[at : at + len(texts)])
            at += len(texts)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _unknown_session(session_id: str, model: str) -> ApiError:
    message = (
        f"session {session_id!r} is unknown or has expired (model {model!r}); create one with "
        "POST /sessions, or send the model that created it"
    )
    return ApiError(404, message, [("session_id", "unknown or expired")])


class TextService:
    def __init__(
        self, engine: Engine, sessions: SessionStore, settings: Settings, *, name: str = ""
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.settings = settings
        self.vocab = engine.vocab
        self.model_id = engine.checkpoint.model_id
        self.name = name or engine.checkpoint.run_dir.name
        self.loaded_at = datetime.now(UTC)
        self._random_seed = RandomSeeds()
        copies = engine.checkpoint.copies
        self._copies = CopyMeter(copies) if copies is not None else None
        # A session's state on the CPU: one text's worth.
        self._state_shapes = state_shapes(engine.checkpoint.config, 1)

    # -- shared steps -------------------------------------------------------------------------

    def encode(
        self, words: list[str] | str | None, on_unknown: OnUnknown, field: str = "seed_words"
    ) -> Seed:
        """Cut a string into the model's words (a list is used as given), map them to ids."""
        tokens = self.vocab.split_words(words) if isinstance(words, str) else list(words or [])
        limit = self.settings.max_seed_words
        if len(tokens) > limit:
            raise ApiError.field(field, f"{len(tokens)} words; at most {limit} are accepted")
        ids, unknown, sizes = self.vocab.encode_words(tokens)
        if unknown and on_unknown == "error":
            by_word = dict(zip(tokens, ids, strict=True))
            described = [
                repr(w)
                if by_word[w] == self.vocab.unk_id
                else f"{w!r} (only as {self.vocab.tokens[by_word[w]]!r})"
                for w in unknown
            ]
            raise ApiError.field(field, "not in the vocabulary: " + ", ".join(described))
        seen = tokens if self.vocab.is_subword else self.vocab.decode(ids)
        return Seed(tokens, ids, seen, unknown, sizes)

    async def _session(self, session_id: str, owner: str | None) -> Session:
        """The session ``session_id`` if the caller whose key has the fingerprint ``owner``
        may see it (a session is seen only by the key that created it)."""
        session = await self.sessions.get(session_id, owner)
        if session is None:
            raise _unknown_session(session_id, self.name)
        return session

    async def _continued_session(self, session_id: str, owner: str | None) -> Session:
        """A session to continue on this model: its state must have this model's shapes (a
        session made before a reload to other shapes gets a 409, not a failed step)."""
        session = await self._session(session_id, owner)
        shapes = hidden_shapes(session.hidden)
        if shapes != self._state_shapes:
            raise ApiError(
                409,
                f"session {session_id!r} holds a state of shape {shapes} from an earlier "
                f"version of model {self.name!r}; {self.model_id} needs {self._state_shapes}: "
                "create a new session",
                [("session_id", "made by a version of the model with another state shape")],
            )
        return session

    async def _model(self, work: Awaitable[T]) -> T:
        """Await engine work, mapping a full queue or a stopping engine to a 503 and a
        generation that passed its deadline to a 504."""
        try:
            return await work
        except EngineBusy as exc:
            raise _busy(exc) from None
        except EngineClosed:
            raise _stopping() from None
        except GenerationCancelled:
            raise ApiError(503, "the generation was cancelled: the server is stopping") from None
        except GenerationTimeout as exc:
            raise ApiError(504, f"{exc}; ask for fewer words or retry later") from None

    def _submit(self, job: GenerationJob) -> Generation:
        try:
            return self.engine.submit(job)
        except EngineBusy as exc:
            raise _busy(exc) from None
        except EngineClosed:
            raise _stopping() from None

    # -- POST /generate -----------------------------------------------------------------------

    def _check(self, req: TextRequest) -> None:
        limits = self.settings
        problems = []
        if req.max_words > limits.max_words:
            problems.append(("max_words", f"at most {limits.max_words}"))
        if req.n > limits.max_samples:
            problems.append(("n", f"at most {limits.max_samples}"))
        if req.top_k > len(self.vocab):
            problems.append(
                ("top_k", f"at most {len(self.vocab)} (the vocabulary size); 0 means all words")
            )
        if req.min_words > req.max_words:
            problems.append(("min_words", f"at most max_words ({req.max_words})"))
        if req.max_copy_words and self.engine.checkpoint.copies is None:
            problems.append(
                (
                    "max_copy_words",
                    "this model's run folder has no index of its training text (it was "
                    "written before copy indexes); continue its training once "
                    "(python -m training --resume) to add one",
                )
            )
        if req.session_id is not None and req.n > 1:
            problems.append(("n", "a session continues one text: use n=1 with session_id"))
        if problems:
            raise ApiError(422, "; ".join(f"{f}: {m}" for f, m in problems), problems)

    async def _plan(self, req: TextRequest, owner: str | None, stream: bool = False) -> _Plan:
        self._check(req)
        seed = self.encode(req.seed_words, req.on_unknown)
        session = await self._continued_session(req.session_id, owner) if req.session_id else None
        history: Sequence[str] = session.words if session else ()
        if session is not None:
            total = len(history) + len(seed.tokens) + req.max_words
            if total > self.settings.session_max_words:
                raise ApiError.field(
                    "max_words",
                    f"the session holds {len(history)} words; with {len(seed.tokens)} seed "
                    f"words and max_words {req.max_words} it would pass its limit of "
                    f"{self.settings.session_max_words}",
                )
        context = [*history, *seed.tokens]
        prefix = self.vocab.join_words(context)[len(self.vocab.join_words(history)) :]
        params = SamplingParams(
            req.top_k,
            req.temperature,
            req.top_p,
            req.uniform,
            req.repetition_penalty,
            req.presence_penalty,
            req.frequency_penalty,
            req.no_repeat_ngram_size,
            self._bad_words(req.bad_words),
            req.max_copy_words,
        )
        job = GenerationJob(
            seed_ids=seed.ids,
            context=context,
            params=params,
            # The text before the new words (the session's and the seed's), for the repetition
            # controls and the model's text cache.
            history=(
                self._history(history, seed.ids)
                if params.penalizes or self.engine.checkpoint.config.cache.enabled
                else ()
            ),
            random_seed=req.random_seed if req.random_seed is not None else self._random_seed(),
            max_words=req.max_words,
            n=req.n,
            stop=tuple(req.stop),
            hidden=session.hidden if session else None,
            keep_state=session is not None,
            min_words=req.min_words,
            stream=stream,
            logprobs=req.logprobs,
        )
        return _Plan(job, seed, session, prefix)

    def _history(self, words: Sequence[str], seed_ids: Sequence[int]) -> list[int]:
        """The ids of a session's ``words`` and then of a seed: the text so far."""
        return [*self.vocab.encode_words(words)[0], *seed_ids]

    def _bad_words(self, phrases: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Each phrase as the ids the model would write it with; a phrase with a word the
        vocabulary lacks cannot be written, and is left out (never <unk> banned instead)."""
        out = []
        for phrase in phrases:
            ids, _, _ = self.vocab.encode_words(self.vocab.split_words(phrase))
            if ids and self.vocab.unk_id not in ids:
                out.append(tuple(ids))
        return tuple(out)

    async def _finish(self, plan: _Plan, result: GenerationResult) -> TextResult:
        first = result.samples[0]
        if plan.session is not None:
            assert result.state is not None
            updated = plan.session.continued(result.state, [*plan.seed.tokens, *first.words])
            if not await self.sessions.replace(updated):
                raise ApiError(
                    409,
                    f"session {plan.session.id!r} changed or ended while this request ran; "
                    "nothing was saved to it",
                    [("session_id", "changed or ended during the request")],
                )
        # Here, not on the inference thread, which is the one that limits throughput.
        copies: Sequence[int | None] = (
            await self._copies.measure([[*plan.job.context, *s.words] for s in result.samples])
            if self._copies is not None
            else [None] * len(result.samples)
        )
        return TextResult(
            model_id=self.model_id,
            random_seed=plan.job.random_seed,
            seed=plan.seed,
            prefix=plan.prefix,
            samples=[
                TextSample(i, s.words, s.text, s.finish_reason, s.pieces, s.log_probs, s.tops, c)
                for i, (s, c) in enumerate(zip(result.samples, copies, strict=True))
            ],
            session_id=plan.session.id if plan.session else None,
        )

    async def generate(self, req: TextRequest, *, owner: str | None) -> TextResult:
        """Run ``req`` to its end; ``owner`` (the caller's key fingerprint) must own its
        session, if it continues one."""
        plan = await self._plan(req, owner)
        generation = self._submit(plan.job)
        return await self._finish(plan, await self._model(generation.result()))

    async def stream(
        self, req: TextRequest, stopping: anyio.Event, *, owner: str | None
    ) -> AsyncIterator[TextEvent]:
        """Check and start a generation, then return its events: each word as it comes, then
        `Finished` or `Failed`.

        Problems found before the stream starts raise ApiError (a 4xx/503 response); after it
        has started they become a `Failed` event, as does ``stopping`` (the server shutting
        down), so a stream never just ends short.
        """
        plan = await self._plan(req, owner, stream=True)
        return self._events(plan, self._submit(plan.job), stopping)

    async def _events(
        self, plan: _Plan, generation: Generation, stopping: anyio.Event
    ) -> AsyncIterator[TextEvent]:
        async def stop_when_stopping() -> None:
            await stopping.wait()
            generation.cancel()

        watcher = asyncio.create_task(stop_when_stopping())
        try:
            async for event in generation.events():
                yield event
            result = await self._finish(plan, await self._model(generation.result()))
        except ApiError as exc:
            yield Failed(exc)
            return
        except Exception:
            log.exception("generation failed after its stream started")
            yield Failed(ApiError(500, INTERNAL_ERROR))
            return
        finally:
            watcher.cancel()
            generation.cancel()  # nothing to stop if it finished; else its client went away
        yield Finished(result)

    # -- sessions -----------------------------------------------------------------------------

    def _public(self, session: Session, unknown: Sequence[str] = ()) -> SessionPublic:
        return SessionPublic(
            session_id=session.id,
            model=self.model_id,
            words=list(session.words),
            text=self.vocab.join_words(session.words),
            word_count=len(session.words),
            created_at=_utc(session.created),
            expires_at=_utc(session.expires),
            unknown_words=list(unknown),
        )

    async def create_session(self, req: SessionCreate, *, owner: str | None) -> SessionPublic:
        seed = self.encode(req.seed_words, req.on_unknown)
        if len(seed.tokens) > self.settings.session_max_words:
            raise ApiError.field(
                "seed_words", f"at most {self.settings.session_max_words} words fit in a session"
            )
        hidden = await self._model(self.engine.prime(seed.ids, None))
        session = await self.sessions.create(hidden, seed.tokens, owner)
        return self._public(session, seed.unknown)

    async def get_session(self, session_id: str, *, owner: str | None) -> SessionPublic:
        return self._public(await self._session(session_id, owner))

    async def delete_session(self, session_id: str, *, owner: str | None) -> None:
        if not await self.sessions.delete(session_id, owner):
            raise _unknown_session(session_id, self.name)

    # -- suggestions and scoring --------------------------------------------------------------

    async def next_words(self, req: NextWordsRequest, *, owner: str | None) -> NextWordsResponse:
        if req.top_k > len(self.vocab):
            raise ApiError.field("top_k", f"at most {len(self.vocab)} (the vocabulary size)")
        seed = self.encode(req.seed_words, req.on_unknown)
        session = await self._continued_session(req.session_id, owner) if req.session_id else None
        hidden = session.hidden if session else None
        history = self._history(session.words, seed.ids) if session else seed.ids
        ranked = await self._model(self.engine.next_words(seed.ids, hidden, req.top_k, history))
        return NextWordsResponse(
            model=self.model_id,
            session_id=session.id if session else None,
            seed_words=seed.seen,
            unknown_words=seed.unknown,
            words=[WordProbability(word=w, probability=p) for w, p in ranked],
        )

    def word_ids(self, words: Sequence[str]) -> list[int]:
        """Each word's id: the word's own, or a subword model's first piece's."""
        ids, _, sizes = self.vocab.encode_words(words)
        firsts, start = [], 0
        for size in sizes:
            firsts.append(ids[start] if size else self.vocab.unk_id)
            start += size
        return firsts

    def tokenize(self, text: Sequence[str] | str) -> TextTokens:
        """``text`` cut and mapped as generation and scoring read it (no model work)."""
        seed = self.encode(text, "replace", field="text")
        if not seed.ids:
            raise ApiError.field("text", "holds no words to tokenize")
        tokens = [self.vocab.tokens[i] for i in seed.ids]
        return TextTokens(self.model_id, self.vocab.tokenizer.name, seed, tokens)

    async def score(self, text: Sequence[str] | str, on_unknown: OnUnknown) -> TextScores:
        """Each word of ``text`` scored from the start of a text (``text`` names the field)."""
        seed = self.encode(text, on_unknown, field="text")
        if not seed.ids:
            raise ApiError.field("text", "holds no words to score")
        log_probs = await self._model(self.engine.score(seed.ids))
        per_word, start = [], 0
        for size in seed.sizes:  # a word's probability: the product of its pieces'
            per_word.append(math.fsum(log_probs[start : start + size]))
            start += size
        writer = Detokenizer(self.vocab.tokenizer)
        pieces = [writer.push(word) for word in seed.tokens]
        return TextScores(self.model_id, seed, per_word, pieces)

    # -- the model card -----------------------------------------------------------------------

    def info(self) -> InfoResponse:
        loaded = self.engine.checkpoint
        manifest: dict[str, Any] = loaded.manifest
        corpus = manifest.get("corpus")
        settings, stats = self.settings, self.engine.counters
        return InfoResponse(
            model=self.model_id,
            name=self.name,
            loaded_at=self.loaded_at,
            run=loaded.run_dir.name,
            device=str(loaded.device),
            quantize=settings.quantize,
            created=manifest.get("created"),
            updated=manifest.get("updated"),
            architecture=loaded.config.to_json(),
            parameters=count_parameters(loaded.model),
            vocab_size=len(self.vocab),
            tokenizer=self.vocab.tokenizer.describe(),
            chat_template=TEMPLATE,
            # The digest and the counts; the sources are paths on the training machine.
            corpus=(
                {k: v for k, v in corpus.items() if k not in ("sources", "valid_sources")}
                if isinstance(corpus, dict)
                else None
            ),
            best_valid_perplexity=manifest.get("best_valid_perplexity"),
            best_valid_bits_per_char=manifest.get("best_valid_bits_per_char"),
            copy_index=loaded.copies is not None,
            training=loaded.training,
            versions=manifest.get("versions") or {},
            limits=Limits(
                max_words=settings.max_words,
                max_samples=settings.max_samples,
                max_seed_words=settings.max_seed_words,
                max_top_k=len(self.vocab),
                max_body_bytes=settings.max_body_bytes,
                session_ttl_seconds=settings.session_ttl_seconds,
                max_sessions=settings.max_sessions,
                session_max_words=settings.session_max_words,
            ),
            served=Served(
                generations=stats.generations,
                words=stats.words,
                cancelled=stats.cancelled,
                failed=stats.failed,
                pending=self.engine.pending,
            ),
        )


def _busy(exc: EngineBusy) -> ApiError:
    return ApiError(503, f"the model is busy ({exc}); retry shortly", headers={"Retry-After": "1"})


def _stopping() -> ApiError:
    return ApiError(503, "the server is stopping; retry shortly", headers={"Retry-After": "2"})
