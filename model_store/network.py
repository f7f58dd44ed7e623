"""The network: embedding -> recurrent cell -> output layer, used by training and serving.

The lab's model is ``nn.Embedding -> nn.RNN(tanh, batch_first) -> nn.Linear(hidden, vocab)``;
`ModelConfig()` with ``cell="rnn_tanh"`` and one layer builds exactly that. The other options:
``rnn_relu``, ``lstm``, ``gru`` cells, several layers, dropout, weight tying, and an adaptive
softmax (``AdaptiveLogSoftmaxWithLoss``) that makes the output layer, nearly all of the work at
large vocabularies, several times cheaper.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from model_store.cache import CacheSettings

CellName = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
CELLS: tuple[str, ...] = ("rnn_tanh", "rnn_relu", "lstm", "gru")
SoftmaxName = Literal["full", "adaptive"]
QuantizeName = Literal["off", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("off", "int8")
SOFTMAXES: tuple[str, ...] = ("full", "adaptive")

# An LSTM's state is (h, c); the other cells' is h alone. Each is (layers, B, hidden_dim).
# Only the hidden-state helpers at the end of this module tell the two forms apart.
Hidden = Tensor | tuple[Tensor, Tensor]
_PART_NAMES = ("h", "c")


class ConfigError(ValueError):
    """Hyperparameters that cannot build a network."""


def adaptive_cutoffs(vocab_size: int) -> tuple[int, ...]:
    """Cluster boundaries for the adaptive softmax, derived from the vocabulary size.

    The head keeps the ~2k most frequent words (they cover most of the running text in a
    frequency-sorted vocabulary); tails of growing size take the rarer words.
    """
    cutoffs: list[int] = []
    for edge in (2_000, 10_000, 40_000):
        if edge < vocab_size - 1:
            cutoffs.append(edge)
    if not cutoffs:
        cutoffs.append(max(1, vocab_size // 4))
    return tuple(cutoffs)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in ``config.json``."""

    vocab_size: int
    cell: CellName = "rnn_tanh"
    embed_dim: int = 64
    hidden_dim: int = 64
    layers: int = 1
    dropout: float = 0.0
    tie_weights: bool = False
    softmax: SoftmaxName = "full"
    cutoffs: tuple[int, ...] | None = None
    div_value: float = 4.0
    # The text cache mixed into the output (model_store.cache); order 0: none.
    cache_order: int = 0
    cache_weight: float = 0.9
    cache_confidence: float = 4.0
    cache_inner_confidence: float | None = None

    def __post_init__(self) -> None:
        # Types first: a config read from JSON may hold "8" or 1.5 where torch needs an int.
        for name in ("vocab_size", "embed_dim", "hidden_dim", "layers"):
            if type(getattr(self, name)) is not int:
                raise ConfigError(f"{name} must be an integer (got {getattr(self, name)!r})")
        if type(self.tie_weights) is not bool:
            raise ConfigError(f"tie_weights must be true or false (got {self.tie_weights!r})")
        for name in ("dropout", "div_value"):
            if type(getattr(self, name)) not in (int, float):
                raise ConfigError(f"{name} must be a number (got {getattr(self, name)!r})")
        if self.cutoffs is not None and not all(type(c) is int for c in self.cutoffs):
            raise ConfigError(f"cutoffs must be integers (got {list(self.cutoffs)!r})")
        problems = []
        if self.vocab_size < 3:
            problems.append("vocab_size must be at least 3")
        if self.cell not in CELLS:
            problems.append(f"cell must be one of {', '.join(CELLS)} (got {self.cell!r})")
        if self.softmax not in SOFTMAXES:
            problems.append(f"softmax must be one of {', '.join(SOFTMAXES)}")
        for name in ("embed_dim", "hidden_dim", "layers"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.tie_weights and self.embed_dim != self.hidden_dim:
            problems.append(
                f"tie_weights needs embed_dim == hidden_dim "
                f"(got {self.embed_dim} and {self.hidden_dim})"
            )
        if self.tie_weights and self.softmax == "adaptive":
            problems.append("tie_weights works with the full softmax only")
        if self.softmax == "adaptive":
            cutoffs = self.resolved_cutoffs()
            if (
                list(cutoffs) != sorted(set(cutoffs))
                or not cutoffs[0] > 0
                or (cutoffs[-1] >= self.vocab_size)
            ):
                problems.append(
                    f"cutoffs must increase strictly within (0, {self.vocab_size}); "
                    f"got {list(cutoffs)}"
                )
        problems += self.cache.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def cache(self) -> CacheSettings:
        return CacheSettings(
            self.cache_order, self.cache_weight, self.cache_confidence, self.cache_inner_confidence
        )

    def resolved_cutoffs(self) -> tuple[int, ...]:
        return tuple(self.cutoffs) if self.cutoffs else adaptive_cutoffs(self.vocab_size)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cutoffs"] = list(self.resolved_cutoffs()) if self.softmax == "adaptive" else None
        return data

    @classmethod
    def from_json(cls, data: Any) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError("the model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        values = dict(data)
        cutoffs = values.get("cutoffs")
        if cutoffs is not None:
            if not isinstance(cutoffs, list):
                raise ConfigError(f"cutoffs must be a list of integers, not {cutoffs!r:.60}")
            values["cutoffs"] = tuple(cutoffs)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc


class LockedDropout(nn.Module):
    """Dropout of (B, T, F) activations with one mask per row, the same at every step
    (variational dropout, as in AWD-LSTM): it drops the same features all along a sequence,
    and draws T times fewer random numbers, which on a CPU cost a noticeable part of a step."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        return x * x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(keep).div_(keep)


CELL_STEPS = 8  # an LSTM is fed up to this many steps cell by cell on a CPU (WordRNN.recur)
# The most a frozen LSTM's input table may take (`WordRNN.tabulate_inputs`): 16 MiB for the
# default model's 4,003 ids and 256 units; a vocabulary of words is often too large for it.
INPUT_TABLE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class _InputTable:
    gates: Tensor  # (V, 4 H): each id's first-layer input projection
    versions: tuple[int, ...]  # of the weights it was made from


def _versions(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    """The tensors' in-place change counters: any optimizer step moves them."""
    return tuple(t._version for t in tensors)


def projected_lstm_cell(
    gates_in: Tensor, state: tuple[Tensor, Tensor], w_hh: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor]:
    """`torch.lstm_cell` given the input's projection: the operations of torch's own CPU
    cell with its input projected beforehand (as its full-sequence layer does), in order,
    so the same numbers come out."""
    h, c = state
    return _lstm_gates(F.linear(h, w_hh, b_hh).add_(gates_in), c)


def _lstm_gates(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """An LSTM cell's new ``(h, c)`` from its (B, 4 H) summed projections, as torch's CPU
    cell works them out."""
    i, f, g, o = gates.unsafe_chunk(4, 1)
    i, f, g, o = i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
    c = (f * c).add_(i * g)
    return o * c.tanh(), c


class WordRNN(nn.Module):
    """Word-level recurrent language model.

    ``features(ids, hidden)`` runs the embedding and the recurrent cell; ``log_probs`` and
    ``loss`` apply the output layer (full or adaptive softmax) to those features.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.drop = LockedDropout(config.dropout)
        rnn_dropout = config.dropout if config.layers > 1 else 0.0
        rnn_kwargs: dict[str, Any] = {
            "input_size": config.embed_dim,
            "hidden_size": config.hidden_dim,
            "num_layers": config.layers,
            "dropout": rnn_dropout,
            "batch_first": True,
        }
        self.rnn: nn.RNNBase | Int8LSTM  # int8: `quantized`
        if config.cell == "lstm":
            self.rnn = nn.LSTM(**rnn_kwargs)
        elif config.cell == "gru":
            self.rnn = nn.GRU(**rnn_kwargs)
        else:
            self.rnn = nn.RNN(nonlinearity=config.cell.removeprefix("rnn_"), **rnn_kwargs)
        self._input_table: _InputTable | None = None  # `tabulate_inputs`
        self.decoder: nn.Linear | Int8Linear | None = None  # int8: `quantized`
        self.adaptive: nn.AdaptiveLogSoftmaxWithLoss | None = None
        if config.softmax == "adaptive":
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(
                config.hidden_dim,
                config.vocab_size,
                cutoffs=list(config.resolved_cutoffs()),
                div_value=config.div_value,
            )
        else:
            self.decoder = nn.Linear(config.hidden_dim, config.vocab_size)
            if config.tie_weights:
                # The embedding's N(0, 1) start would make the shared output layer's first
                # scores huge (sqrt(hidden) times a state's norm): start small, as weight
                # tying's authors do.
                nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
                nn.init.zeros_(self.decoder.bias)
                self.decoder.weight = self.embedding.weight

    def init_hidden(self, batch: int) -> Hidden:
        """Zero state for ``batch`` rows, on the model's device and dtype."""
        weight = self.embedding.weight
        return _from_parts([weight.new_zeros(s) for s in state_shapes(self.config, batch)])

    def features(self, ids: Tensor, hidden: Hidden | None = None) -> tuple[Tensor, Hidden]:
        """(B, T) ids -> (B, T, H) top-layer outputs and the new hidden state."""
        emb = self.drop(self.embedding(ids))  # (B, T, E)
        out, hidden = self.rnn(emb, hidden)  # (B, T, H)
        return self.drop(out), cast(Hidden, hidden)

    def step(self, ids: Tensor, hidden: Hidden) -> Hidden:
        """Feed (B,) ids, one per row, on top of ``hidden``: the state after them."""
        return self.feed(ids.unsqueeze(1), hidden)

    def feed(self, ids: Tensor, hidden: Hidden | None = None) -> Hidden:
        """Feed (B, T) ids through the embedding and the recurrent cell on top of ``hidden``
        (zeros when None): the state after them. With an input table (`tabulate_inputs`), the
        first LSTM layer's input projections are read from it instead of computed."""
        table = self._input_table
        if table is not None and self._table_is_current(table):
            if isinstance(self.rnn, Int8LSTM):
                return self.rnn.run(F.embedding(ids, table.gates), hidden)[1]
            if self._by_cells(ids):
                return self._lstm_cells(F.embedding(ids, table.gates), hidden, projected=True)
        return self.recur(self.embedding(ids), hidden)

    def tabulate_inputs(self, max_bytes: int = INPUT_TABLE_BYTES) -> bool:
        """Work out once, for every id, what the first LSTM layer makes of its embedding
        (``W_ih x + b_ih``: a (V, 4 H) table of at most ``max_bytes``), so that each step of
        a frozen model reads rows instead of multiplying. That product is half of a cell
        step's multiply-adds (as many as the recurrent weights'), and a joining seed's few
        rows read all its weights once per word. Whether the model has a table: an LSTM (or
        an `Int8LSTM`) on a CPU whose table fits, with weights whose changes can be told (not
        inference tensors); other cells' steps go through the module.

        The states are those fed without a table up to their last bits, which some CPUs'
        matrix kernels round differently for a product of a few rows and one of thousands
        (an `Int8LSTM`'s are the same bits). Changing the weights (training) retires the
        table; it is not in the state dict."""
        self._input_table = None
        projection = self._first_projection()
        weight = self.embedding.weight
        if projection is None or weight.device.type != "cpu":
            return False
        project, sources = projection
        if any(t.is_inference() for t in sources):
            return False
        if weight.shape[0] * 4 * self.config.hidden_dim * weight.element_size() > max_bytes:
            return False
        with torch.no_grad():
            gates = project(weight)
        self._input_table = _InputTable(gates, _versions(sources))
        return True

    def _first_projection(self) -> tuple[Callable[[Tensor], Tensor], tuple[Tensor, ...]] | None:
        """The first LSTM layer's input projection and the tensors an input table made with it
        depends on (the embedding and that layer's input weights); None for a cell that has
        no table."""
        embedding = self.embedding.weight
        if isinstance(self.rnn, Int8LSTM):
            first = self.rnn.inputs[0]
            return first, (embedding, *first.buffers())
        if type(self.rnn) is nn.LSTM:
            w_ih, _, b_ih, _ = self.rnn.all_weights[0]
            return (lambda x: F.linear(x, w_ih, b_ih)), (embedding, w_ih, b_ih)
        return None

    def _table_is_current(self, table: _InputTable) -> bool:
        projection = self._first_projection()
        if projection is not None and _versions(projection[1]) == table.versions:
            return True
        self._input_table = None  # the weights changed since
        return False

    def _by_cells(self, inputs: Tensor) -> bool:
        """Whether ``inputs`` ((B, T, ...)) are fed cell by cell (`recur`)."""
        return (
            type(self.rnn) is nn.LSTM
            and not self.rnn.training
            and inputs.device.type == "cpu"
            and inputs.shape[1] <= CELL_STEPS
        )

    def recur(self, inputs: Tensor, hidden: Hidden | None = None) -> Hidden:
        """Feed (B, T, E) inputs through the recurrent cell on top of ``hidden`` (zeros when
        None): the state after them, as ``self.rnn`` gives it.

        An LSTM in eval mode on a CPU is fed a few steps (up to `CELL_STEPS`; a generation
        step is one) layer by layer with `torch.lstm_cell`, which gives the numbers of torch's
        own LSTM kernel. The module would take oneDNN's kernel (on by default), which has a
        fixed cost a call: one row's step measured 6x slower (256 units) and 14x (two layers
        of 650), and a server's one-row generations (``--engine naive``) went 44% faster
        without it. A longer sequence, where oneDNN's kernel wins, is fed by the module.
        """
        if not self._by_cells(inputs):
            _, hidden = self.rnn(inputs, hidden)
            return cast(Hidden, hidden)
        return self._lstm_cells(inputs, hidden, projected=False)

    def _lstm_cells(self, inputs: Tensor, hidden: Hidden | None, projected: bool) -> Hidden:
        """The LSTM fed (B, T, ...) ``inputs`` step by step with `torch.lstm_cell`; with
        ``projected`` the inputs are the first layer's (B, T, 4 H) input projections."""
        h, c = cast(tuple[Tensor, Tensor], hidden or self.init_hidden(inputs.shape[0]))
        layers = self.rnn.all_weights  # each layer's weight_ih, weight_hh, bias_ih, bias_hh
        hs, cs = list(h.unbind(0)), list(c.unbind(0))
        for t in range(inputs.shape[1]):
            x = inputs[:, t]
            for layer, weights in enumerate(layers):
                state = (hs[layer], cs[layer])
                if projected and layer == 0:
                    hs[0], cs[0] = projected_lstm_cell(x, state, weights[1], weights[3])
                else:
                    hs[layer], cs[layer] = torch.lstm_cell(x, state, *weights)
                x = hs[layer]
        return torch.stack(hs), torch.stack(cs)

    def log_probs(self, features: Tensor) -> Tensor:
        """(..., H) features -> (..., V) log-probabilities of the next word."""
        if self.adaptive is not None:
            flat = features.reshape(-1, features.shape[-1])
            return self.adaptive.log_prob(flat).reshape(*features.shape[:-1], -1)
        assert self.decoder is not None
        return F.log_softmax(self.decoder(features), dim=-1)

    def logits(self, features: Tensor) -> Tensor:
        """(..., H) -> (..., V) unnormalised scores (log-probabilities for the adaptive head)."""
        if self.adaptive is not None:
            return self.log_probs(features)
        assert self.decoder is not None
        return cast(Tensor, self.decoder(features))

    def target_log_probs(self, features: Tensor, targets: Tensor) -> Tensor:
        """(N, H) features and (N,) target ids -> (N,) each target's log-probability (the
        network's own, before any text cache)."""
        if self.adaptive is not None:
            return cast(Tensor, self.adaptive(features, targets).output)
        assert self.decoder is not None
        return -F.cross_entropy(self.decoder(features), targets, reduction="none")

    def loss(self, features: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of (B, T, H) features against (B, T) target ids."""
        flat = features.reshape(-1, features.shape[-1])  # (B*T, H)
        if self.adaptive is not None:
            return cast(Tensor, self.adaptive(flat, targets.reshape(-1)).loss)
        assert self.decoder is not None
        return F.cross_entropy(self.decoder(flat), targets.reshape(-1))

    def forward(self, ids: Tensor, hidden: Hidden | None = None) -> tuple[Tensor, Hidden]:
        """(B, T) ids -> (B, T, V) logits and the new hidden state."""
        out, hidden = self.features(ids, hidden)
        return self.logits(out), hidden


class Int8Linear(nn.Module):
    """A frozen `nn.Linear` with int8 weights (one scale per output), for serving on a CPU.

    Each input row is quantized with a scale of its own and multiplied in integers
    (``torch._int_mm``: exact int32 sums), so a row's output is the same whatever rows share
    its batch, and a ``random_seed`` gives the same words beside other requests as alone.
    torch's dynamic quantization scales a whole batch at once: a row's scores moved with the
    rows beside it, and a sample's words with the requests that shared its steps.
    """

    weight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        """From a float layer's (out, in) ``weight`` and its ``bias``."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        ints, scale = _to_int8(weight.detach().float())
        self.register_buffer("weight", ints)
        self.register_buffer("scale", scale.squeeze(1))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        ints, scale = _to_int8(x.reshape(-1, self.in_features).float())
        out = torch._int_mm(ints, self.weight.t()).float().mul_(self.scale).mul_(scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def _to_int8(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float rows as int8 and their (N, 1) scales: each row's largest magnitude over
    127, so that the row rounds into int8 (a row of zeros gets the smallest normal float, not
    a division by zero). The same rule for weights and inputs."""
    scale = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp_min(_SMALLEST_NORMAL)
    return torch.round(rows / scale).to(torch.int8), scale


class Int8LSTM(nn.Module):
    """A frozen `WordRNN` LSTM (batch first) whose products are `Int8Linear`s, for serving on
    a CPU: each layer's input projection (``W_ih x + b_ih``) and recurrent one (``W_hh h +
    b_hh``), then torch's gate arithmetic (`_lstm_gates`).

    Each row is quantized by itself, so a row's state is the same whatever rows share its
    steps and whichever way it is fed: a step, a seed, seeds of several lengths packed
    together, a text to score (torch's int8 LSTM scales a whole batch at once). Called as the
    module it replaces, ``(out, (h, c))``, a `PackedSequence` in and out too; `run` starts from
    the first layer's input projections (read from `WordRNN.tabulate_inputs`'s table).
    """

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.hidden_size = lstm.hidden_size
        self.inputs = nn.ModuleList(Int8Linear(w[0], w[2]) for w in lstm.all_weights)
        self.recurrent = nn.ModuleList(Int8Linear(w[1], w[3]) for w in lstm.all_weights)

    def forward(
        self, inputs: Tensor | PackedSequence, hidden: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        """(B, T, E) inputs (or packed rows of several lengths) fed on top of ``hidden``
        (zeros when None): the top layer's outputs and the state after each row."""
        if not isinstance(inputs, PackedSequence):
            return self.run(self.inputs[0](inputs), hidden)
        padded, lengths = pad_packed_sequence(inputs, batch_first=True)
        out, state = self.run(self.inputs[0](padded), hidden, lengths)
        return pack_padded_sequence(out, lengths, batch_first=True, enforce_sorted=False), state

    def run(
        self,
        gates: Tensor,
        hidden: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The first layer's (B, T, 4 H) input projections fed on top of ``hidden``: the top
        layer's (B, T, H) outputs and the state after each row's ``lengths`` steps (all T
        when None; a row's later steps are worked out, and left out)."""
        rows, steps = gates.shape[:2]
        if hidden is None:
            zeros = gates.new_zeros(len(self.recurrent), rows, self.hidden_size)
            hidden = (zeros, zeros)
        ends = None if lengths is None else (lengths - 1).to(gates.device).unsqueeze(1)
        hs: list[Tensor] = []
        cs: list[Tensor] = []
        for layer, recurrent in enumerate(self.recurrent):
            h, c = hidden[0][layer], hidden[1][layer]
            end_h, end_c = h, c
            outs: list[Tensor] = []
            for t in range(steps):
                h, c = _lstm_gates(recurrent(h).add_(gates[:, t]), c)
                outs.append(h)
                if ends is not None:
                    at = ends == t
                    end_h, end_c = torch.where(at, h, end_h), torch.where(at, c, end_c)
            out = outs[0].unsqueeze(1) if steps == 1 else torch.stack(outs, 1)
            hs.append(h if ends is None else end_h)
            cs.append(c if ends is None else end_c)
            if layer + 1 < len(self.recurrent):  # the next layer's input: these outputs
                gates = self.inputs[layer + 1](out)
        if len(hs) == 1:  # one layer: its state as it is, not a copy
            return out, (hs[0].unsqueeze(0), cs[0].unsqueeze(0))
        return out, (torch.stack(hs), torch.stack(cs))


def quantized(model: WordRNN) -> WordRNN:
    """``model``, changed in place for the CPU: every linear layer (the output layer, nearly
    all of a step's work, or an adaptive softmax's) becomes an `Int8Linear`, and an LSTM an
    `Int8LSTM` (whose steps still read their input projections from a table,
    `WordRNN.tabulate_inputs`). The embedding stays float, and so do a GRU's and an RNN's
    cells: torch's int8 GRU scales a whole batch at once."""
    if type(model.rnn) is nn.LSTM:
        model.rnn = Int8LSTM(model.rnn)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child.weight, child.bias))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Hidden-state helpers: the one place that knows an LSTM's state is a pair


def state_shapes(config: ModelConfig, rows: int) -> list[tuple[int, ...]]:
    """The shapes a state for ``rows`` texts must have, to refuse a stored state that does not
    fit the model before it reaches the cell."""
    shape = (config.layers, rows, config.hidden_dim)
    return [shape] * (2 if config.cell == "lstm" else 1)


def hidden_parts(hidden: Hidden) -> tuple[Tensor, ...]:
    """``(h,)`` or ``(h, c)``: the state's tensors, for code that treats each part alike."""
    return hidden if isinstance(hidden, tuple) else (hidden,)


def _from_parts(parts: Sequence[Tensor]) -> Hidden:
    return (parts[0], parts[1]) if len(parts) == 2 else parts[0]


def hidden_map(hidden: Hidden, fn: Callable[[Tensor], Tensor]) -> Hidden:
    """``fn`` applied to every part, keeping the state's form."""
    return _from_parts([fn(part) for part in hidden_parts(hidden)])


def hidden_shapes(hidden: Hidden) -> list[tuple[int, ...]]:
    """The parts' shapes, comparable with `state_shapes`."""
    return [tuple(part.shape) for part in hidden_parts(hidden)]


def hidden_to_tensors(hidden: Hidden) -> dict[str, Tensor]:
    """The state as named CPU tensors, ``h`` and (an LSTM's) ``c``, ready for safetensors: the
    names, not a count, say which form a stored state has."""
    parts = hidden_parts(hidden)
    return {n: t.detach().cpu().contiguous() for n, t in zip(_PART_NAMES, parts, strict=False)}


def hidden_from_tensors(tensors: Mapping[str, Tensor]) -> Hidden:
    """The state `hidden_to_tensors` stored. A stored state comes from outside the process (a
    shared session store, a resume file), so a malformed one is a ValueError that says what is
    wrong, not a KeyError or a shape error deep in the cell."""
    names = sorted(tensors)
    if names not in (["h"], ["c", "h"]):
        raise ValueError(
            f"a hidden state holds tensors 'h', or 'h' and 'c' for an LSTM; got {names or 'none'}"
        )
    parts = [tensors[name] for name in _PART_NAMES if name in tensors]
    if parts[0].dim() != 3 or any(part.shape != parts[0].shape for part in parts):
        described = ", ".join(
            f"{n} {list(t.shape)}" for n, t in zip(_PART_NAMES, parts, strict=False)
        )
        raise ValueError(
            "a hidden state's tensors are (layers, rows, hidden_dim), the same for h and c; "
            f"got {described}"
        )
    return _from_parts(parts)


def top_features(hidden: Hidden) -> Tensor:
    """The top layer's output for the last fed word, read back from the hidden state: (B, H).

    For every cell the last time step's output equals the top layer's ``h``, so a generation
    state needs only the hidden state (a few kilobytes) to produce the next word's logits.
    """
    return hidden_parts(hidden)[0][-1]


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph between BPTT windows while keeping the values (truncated BPTT)."""
    return hidden_map(hidden, Tensor.detach)


def hidden_to(hidden: Hidden, device: torch.device) -> Hidden:
    """``hidden`` on ``device``: a session's state is kept on the CPU between requests."""
    return hidden_map(hidden, lambda part: part.to(device))


def hidden_select(hidden: Hidden, rows: Tensor | list[int]) -> Hidden:
    """Rows of a batched hidden state (the batch is dim 1)."""
    index = rows if isinstance(rows, Tensor) else torch.tensor(rows, dtype=torch.long)
    return hidden_map(hidden, lambda part: part.index_select(1, index.to(part.device)))


def hidden_cat(parts: list[Hidden]) -> Hidden:
    """Join single- or multi-row hidden states into one batch (dim 1)."""
    columns = zip(*(hidden_parts(p) for p in parts), strict=True)
    return _from_parts([torch.cat(column, 1) for column in columns])
