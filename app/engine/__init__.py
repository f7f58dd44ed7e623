"""The engine: the one inference thread that owns the model, and how it schedules the work.

Three parts, one module each:

- `app.engine.handles`: a generation seen from the event loop (`GenerationJob`, the
  `Generation` handle, its `WordEvent` words and `GenerationResult`) and how it can end
  (`EngineBusy`, `EngineClosed`, `GenerationCancelled`, `GenerationTimeout`,
  `GenerationFailed`).
- `app.engine.batch`: thread-free stepping of many requests' rows together (`Batch`), and of
  one request alone (`generate_alone`), with the same per-row step.
- `app.engine.scheduler`: the inference thread (`Engine`: loading, admission, one-off model
  work, its `EngineStats`) and its ways to schedule generations (`BatchedEngine`,
  `NaiveEngine`, and `NoopEngine` for the benchmark's ceiling).
"""

from app.engine.batch import Batch, generate_alone
from app.engine.handles import (
    EngineBusy,
    EngineClosed,
    Generation,
    GenerationCancelled,
    GenerationFailed,
    GenerationJob,
    GenerationResult,
    GenerationTimeout,
    WordEvent,
)
from app.engine.scheduler import (
    ENGINES,
    SECONDS_BUCKETS,
    BatchedEngine,
    Durations,
    Engine,
    EngineStats,
    NaiveEngine,
    NoopEngine,
)

__all__ = [
    "ENGINES",
    "SECONDS_BUCKETS",
    "Batch",
    "BatchedEngine",
    "Durations",
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "EngineStats",
    "Generation",
    "GenerationCancelled",
    "GenerationFailed",
    "GenerationJob",
    "GenerationResult",
    "GenerationTimeout",
    "NaiveEngine",
    "NoopEngine",
    "WordEvent",
    "generate_alone",
]
