"""API fuzzing for longer than the test suite does: schemathesis against the app's own schema.

    python -m bench.fuzz --max-time 180                # rounds until 3 minutes have passed
    python -m bench.fuzz --max-examples 200 --seed 7   # one round, 200 cases per operation

In-process: ``schemathesis.openapi.from_asgi`` reads the schema the app serves and sends it
the requests, no socket in between. The app serves ``--run-dir``, or by default a throwaway
run folder with random weights (fuzzing needs a model, not a good one).

A round sends every operation ``--max-examples`` schema-valid and as many schema-invalid
requests, with the checks of ``tests/test_api_fuzz.py``: all of schemathesis' (no 5xx, a
documented status, content type and body, invalid data refused, ``Allow`` on a 405), with
`accepted_unless_limited` in place of ``positive_data_acceptance``. Then the GET and DELETE
operations again on an app with API keys, sending a valid key: schemathesis also sends each
request without it and with a made-up one, which must get a 401. Rounds repeat with the next
seed until ``--max-time`` has passed (without it, one round).

Prints the operations, the cases tried and each distinct failure once, with a request that
shows it; exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis import APIOperation, BaseSchema, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import positive_data_acceptance
from schemathesis.errors import FailureGroup
from schemathesis.python import asgi

from app.main import create_app
from app.settings import Settings
from model_store import checkpoint
from model_store.network import ModelConfig, WordRNN
from model_store.vocab import Vocab, tokenize

# Refusals of schema-valid requests for limits of the deployment or the model, which the
# static schema cannot state (GET /info lists them): the field, and what its refusal says.
LIMITS: dict[str, tuple[str, ...]] = {
    "max_words": ("at most", "the session holds"),
    "max_tokens": ("at most",),
    "n": ("at most", "a session continues one text"),
    "top_k": ("at most",),
    "seed_words": ("are accepted", "not in the vocabulary", "fit in a session"),
    "text": ("are accepted", "not in the vocabulary", "no words to score"),
    "prompt": ("are accepted", "prompts in one request"),
    "messages": ("are accepted",),  # the conversation's words, past the seed limit
    "max_completion_tokens": ("at most",),
    "best_of": ("only 1 (or n)",),
    "min_words": ("at most max_words",),  # a rule between two fields, which no schema states
}
API_KEY = "fuzz-key-0123456789"
# Both ways of sending a key, so that schemathesis knows them as explicit (valid) credentials.
KEY_HEADERS = {"X-API-Key": API_KEY, "Authorization": f"Bearer {API_KEY}"}
# A request still unanswered after this long is a failure (a hang), not a wait.
REQUEST_TIMEOUT_SECONDS = 30.0
TEXT = (
    "I can see the sea. The sea is blue; the sky is blue.\n"
    "You can hear the wind, and the wind can hear me!\n\n"
    '"Where is the ship?" she asked. It is there, near the rocks...\n'
)


def _refusals(error: Any) -> list[tuple[str, str]]:
    """(top-level field, message) for each field an error body blames (``stop[1]`` -> ``stop``)."""
    if not isinstance(error, dict):
        return []
    if isinstance(error.get("error"), dict):  # OpenAI's body names one parameter
        blamed = [(error["error"].get("param") or "", str(error["error"].get("message")))]
    else:
        blamed = [(str(e.get("field")), str(e.get("message"))) for e in error.get("errors", [])]
    return [(field.split("[")[0].split(".")[0], message) for field, message in blamed]


def _excused(field: str, message: str) -> bool:
    """Whether refusing ``field`` of a schema-valid request is what this API means."""
    return any(reason in message for reason in LIMITS.get(field, ()))


def accepted_unless_limited(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A schema-valid request is accepted, or refused only for a deployment or model limit.

    Replaces schemathesis' ``positive_data_acceptance``, which would accept no 4xx at all: the
    static schema cannot state the limits that ``GET /info`` lists.
    """
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if response.status_code not in (400, 422):
        return None
    refusals = _refusals(response.json())
    if not refusals or not all(_excused(f, m) for f, m in refusals):
        raise AssertionError(
            f"a schema-valid request was refused with {response.status_code}: {response.text}"
        )
    return None


def throwaway_run(run_dir: Path) -> Path:
    """A run folder with seeded random weights on a small vocabulary."""
    vocab = Vocab.build(tokenize(TEXT))
    config = ModelConfig(vocab_size=len(vocab), embed_dim=16, hidden_dim=16)
    torch.manual_seed(0)
    checkpoint.commit(
        run_dir,
        config=config,
        training={"seed": 0},
        vocab=vocab,
        weights=checkpoint.weights_state(WordRNN(config)),
        iteration=1,
        info={"best_valid_perplexity": None},
    )
    return run_dir


@dataclass
class Target:
    """An app and what is checked on it."""

    name: str
    schema: BaseSchema
    headers: dict[str, str]
    excluded_checks: list[Callable[..., Any]]


@dataclass
class Tally:
    """Full rounds, cases sent per "target operation", and each distinct failure once."""

    rounds: int = 0
    cases: Counter[str] = field(default_factory=Counter)
    # (target, operation, failure) -> a request that shows it
    failures: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def record(self, key: tuple[str, str, str], case: Case) -> None:
        self.failures.setdefault(key, case.as_curl_command())

    def failures_of(self, name: str) -> int:
        return sum(1 for target, operation, _ in self.failures if f"{target} {operation}" == name)


def targets(run_dir: Path) -> list[Target]:
    limits = {"max_words": 50, "max_samples": 4, "max_seed_words": 200}
    open_app = create_app(Settings(model_dir=run_dir, device="cpu", **limits))
    keyed_app = create_app(
        Settings(model_dir=run_dir, device="cpu", api_keys=[SecretStr(API_KEY)], **limits)
    )
    return [
        Target(
            "open",
            schemathesis.openapi.from_asgi("/openapi.json", open_app),
            {},
            [positive_data_acceptance],
        ),
        Target(
            "keys",
            schemathesis.openapi.from_asgi("/openapi.json", keyed_app).include(
                method=["GET", "DELETE"]
            ),
            KEY_HEADERS,
            [positive_data_acceptance],
        ),
    ]


def fuzz_operation(
    target: Target,
    operation: APIOperation,
    mode: GenerationMode,
    examples: int,
    seed: int,
    deadline: float,
    tally: Tally,
) -> None:
    """Send ``examples`` cases of ``mode``, recording every failure instead of stopping."""
    label = f"{operation.method.upper()} {operation.path}"

    @hypothesis.seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # nothing is raised, so nothing to shrink
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        if time.monotonic() > deadline:
            return
        tally.cases[f"{target.name} {label}"] += 1
        try:
            case.call_and_validate(
                headers=target.headers or None,
                excluded_checks=target.excluded_checks,
                additional_checks=[accepted_unless_limited],
                timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except FailureGroup as group:
            for failure in group.exceptions:
                tally.record((target.name, label, failure.title), case)
        except Exception as exc:  # a transport error: a hang or a crash of the app
            tally.record((target.name, label, f"{type(exc).__name__}: {exc}"), case)

    try:
        run()
    except Unsatisfiable:
        if mode is not GenerationMode.NEGATIVE:
            raise
        # An operation without parameters or body has nothing to make invalid.


def fuzz(all_targets: Sequence[Target], examples: int, seed: int, max_time: float | None) -> Tally:
    tally = Tally()
    started = time.monotonic()
    deadline = started + max_time if max_time else float("inf")
    while True:
        for target in all_targets:
            for result in target.schema.get_all_operations():
                operation = result.ok()
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    if time.monotonic() > deadline:
                        return tally
                    round_seed = seed + tally.rounds
                    fuzz_operation(target, operation, mode, examples, round_seed, deadline, tally)
        tally.rounds += 1
        if max_time is None:
            return tally


def report(tally: Tally, seconds: float) -> str:
    lines = [
        f"{'target and operation':<40} {'cases':>7} {'failures':>9}",
        *(
            f"{name:<40} {count:>7} {tally.failures_of(name):>9}"
            for name, count in sorted(tally.cases.items())
        ),
        "",
        f"operations: {len(tally.cases)}, cases tried: {sum(tally.cases.values())}, "
        f"distinct failures: {len(tally.failures)}, full rounds: {tally.rounds}, "
        f"seconds: {seconds:.0f}",
    ]
    for (target, operation, failure), request in sorted(tally.failures.items()):
        lines += ["", f"FAILURE [{target}] {operation}: {failure}", f"    {request}"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        default=50,
        metavar="N",
        help="cases per operation and mode in each round (default 50)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first round (default 0)")
    parser.add_argument(
        "--max-time",
        type=float,
        metavar="SECONDS",
        help="repeat rounds, with the next seed, until this long has passed",
    )
    parser.add_argument(
        "--run-dir", type=Path, help="the run folder to serve (default: a throwaway random model)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_examples < 1 or (args.max_time is not None and args.max_time <= 0):
        print("error: --max-examples and --max-time must be positive", file=sys.stderr)
        return 2
    if args.run_dir is not None:
        try:
            checkpoint.load(args.run_dir, "cpu")
        except checkpoint.CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.run_dir or throwaway_run(Path(scratch) / "run")
        try:
            tally = fuzz(targets(run_dir), args.max_examples, args.seed, args.max_time)
        finally:
            asgi.shutdown_lifespans()  # stop the apps' engines before their folder goes
    print(report(tally, time.monotonic() - started))
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
