"""Selective Sample Replay (SSR, VL-Rethinker): a FIFO buffer of samples with non-zero advantage,
replayed in proportion to |advantage|^alpha.

VL-Rethinker (Wang et al., 2025, "VL-Rethinker: Incentivizing Self-Reflection of Vision-Language Models
with Reinforcement Learning", arXiv 2504.08837, Sec. 3, Selective Sample Replay) counters "vanishing
advantages" (groups whose rewards are all equal carry no gradient) by keeping samples whose advantage is
non-zero and drawing from them with

    P(j) = |A_j|^alpha / sum_k |A_k|^alpha          over the entries k with A_k != 0

(the formula as issue 16 and our reading of the paper give it; its SSR paragraph was not readable here, only
the section introducing it and the official code were).

Departures from the official code (``openrlhf/trainer/ppo_utils/replay_buffer.py``,
``shuffle_for_filter_mode``), which draws from the current iteration's items *with* replacement with
P(j) proportional to |A_j| + 1e-4 (alpha = 1) over the non-zero-advantage items plus up to 10% as many
all-correct zero-advantage ones: here the buffer
holds the last ``capacity`` non-zero-advantage samples across iterations (issue 16's ``replay.size``),
zero-advantage samples never enter it, alpha is a parameter, and ``sample`` draws without replacement
(``torch.multinomial``, successive weighted draws) so one batch never holds the same sample twice.

The buffer's ``state_dict`` is a flat dict of tensors (safetensors can save it): with it, a resumed run
draws exactly what an uninterrupted one would, given the same ``torch.Generator`` state.

Per-token advantages: an entry can hold its advantages per token (a sequence field) besides the scalar that
decides admission and replay probability. Where that row is only the scalar repeated over the completion (every
sequence-level method), ``constant_fields`` lets the state leave it out, so such a buffer saves exactly the tensors
a buffer without the field saves, and loading rebuilds the row.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import Tensor

from shared.config import ConfigError

__all__ = ["ReplayBuffer", "check_replay_size", "ssr_probabilities"]


def check_replay_size(size: int, field: str = "replay.size") -> int:
    """Return ``size`` if it is a whole number >= 1; a replay buffer of 0 samples can replay nothing."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(
            f"{field} must be a whole number of samples >= 1 when replay is on, got {size!r}; "
            "set it to e.g. 4x the samples per iteration, or turn replay off"
        )
    return size


def ssr_probabilities(advantages: Tensor, alpha: float = 1.0) -> Tensor:
    """SSR replay probabilities P(j) = |A_j|^alpha / sum_k |A_k|^alpha over entries with A_k != 0
    (Wang et al., 2025, "VL-Rethinker: Incentivizing Self-Reflection of Vision-Language Models with
    Reinforcement Learning", arXiv 2504.08837, Sec. 3 Selective Sample Replay; equation number and text not
    checked, see the module docstring); entries with A_j == 0 get probability exactly 0.

    alpha = 0 is uniform over the non-zero entries, alpha = 1 proportional to |A|, larger alpha favours the
    largest |A| more. Computed in float64 as (|A_j| / max|A|)^alpha so large alpha does not overflow.

    Args:
        advantages: [N] advantages (any float dtype); NaN is refused.
        alpha: exponent >= 0.

    Returns:
        float64 [N] probabilities summing to 1.
    """
    if not isinstance(advantages, Tensor) or advantages.dim() != 1:
        shape = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must be a 1-D tensor [N], got {shape}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    magnitude = advantages.detach().to(torch.float64).abs()  # [N]
    if bool(torch.isnan(magnitude).any()):
        raise ValueError(
            f"advantages contain NaN at positions {torch.nonzero(torch.isnan(magnitude)).flatten().tolist()[:20]}"
        )
    nonzero = magnitude > 0  # [N]
    if not bool(nonzero.any()):
        raise ValueError("no entry has a non-zero advantage, so there is nothing to replay")
    relative = magnitude / magnitude.max()  # [N] in [0, 1]; the largest is exactly 1
    weights = torch.where(nonzero, relative.pow(alpha), torch.zeros_like(relative))  # [N]; 0 ** 0 stays out
    return weights / weights.sum()


class ReplayBuffer:
    """FIFO buffer of samples with non-zero advantage, sampled without replacement by ``ssr_probabilities``.

    An entry is a dict of tensors with a fixed key set given at construction: ``scalar_fields`` hold 0-D
    tensors (the advantage, a prompt index, an iteration number, ...), ``sequence_fields`` hold 1-D tensors
    of any length (token ids, old per-token log-probs, a loss mask, ...). Each field has a fixed dtype;
    entries of another dtype or shape are refused rather than converted. Entries are stored as detached
    CPU copies, oldest first; adding past ``capacity`` evicts the oldest. Sampling does not remove entries.

    Args:
        capacity: the most entries kept (>= 1).
        scalar_fields: name -> dtype of the 0-D fields; must include ``advantage_field`` with a float dtype.
        sequence_fields: name -> dtype of the 1-D fields.
        advantage_field: the scalar field that decides admission (!= 0) and replay probability.
        alpha: the SSR exponent of ``ssr_probabilities``.
        constant_fields: sequence field -> (scalar field, sequence field): the first is usually the scalar repeated
            over the other's length (per-token advantages of a sequence-level advantage). ``state_dict`` leaves it
            out when that holds for every entry, and ``load_state_dict`` then rebuilds it.
    """

    def __init__(
        self,
        capacity: int,
        scalar_fields: Mapping[str, torch.dtype],
        sequence_fields: Mapping[str, torch.dtype] | None = None,
        advantage_field: str = "advantage",
        alpha: float = 1.0,
        constant_fields: Mapping[str, tuple[str, str]] | None = None,
    ):
        self.capacity = check_replay_size(capacity, field="capacity")
        self.scalar_fields = dict(scalar_fields)
        self.sequence_fields = dict(sequence_fields or {})
        overlap = sorted(set(self.scalar_fields) & set(self.sequence_fields))
        if overlap:
            raise ValueError(f"fields {overlap} are given both as scalar and as sequence fields; give each once")
        for name in [*self.scalar_fields, *self.sequence_fields]:
            if not name or "/" in name:
                raise ValueError(f"field name {name!r} must be non-empty and contain no '/' (it keys the state dict)")
        if advantage_field not in self.scalar_fields or not self.scalar_fields[advantage_field].is_floating_point:
            raise ValueError(
                f"advantage_field {advantage_field!r} must be one of the scalar_fields with a float dtype, "
                f"got scalar_fields {self.scalar_fields}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.constant_fields = dict(constant_fields or {})
        for name, (scalar, like) in self.constant_fields.items():
            if name not in self.sequence_fields or scalar not in self.scalar_fields or like not in self.sequence_fields:
                raise ValueError(
                    f"constant_fields[{name!r}] = ({scalar!r}, {like!r}) must name a sequence field, a scalar field "
                    "and a sequence field of this buffer"
                )
        self.advantage_field = advantage_field
        self.alpha = float(alpha)
        self.entries: list[dict[str, Tensor]] = []  # oldest first

    def __len__(self) -> int:
        return len(self.entries)

    def _checked_entry(self, entry: Mapping[str, Tensor], position: int) -> dict[str, Tensor]:
        expected = set(self.scalar_fields) | set(self.sequence_fields)
        if set(entry) != expected:
            missing, unexpected = sorted(expected - set(entry)), sorted(set(entry) - expected)
            raise ValueError(f"entry {position} has missing keys {missing} and unexpected keys {unexpected}")
        stored = {}
        for name, value in entry.items():
            scalar = name in self.scalar_fields
            dtype = self.scalar_fields[name] if scalar else self.sequence_fields[name]
            if not isinstance(value, Tensor) or value.dim() != (0 if scalar else 1) or value.dtype != dtype:
                described = (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"entry {position} field {name!r} must be a {'0-D' if scalar else '1-D'} tensor of {dtype}, "
                    f"got {described}"
                )
            stored[name] = value.detach().to("cpu", copy=True)
        advantage = float(stored[self.advantage_field])
        if math.isnan(advantage):
            raise ValueError(f"entry {position} has a NaN {self.advantage_field}; fix the reward before storing it")
        return stored

    def add(self, entries: Iterable[Mapping[str, Tensor]]) -> int:
        """Store the entries whose advantage is non-zero, oldest evicted past capacity; returns how many were stored."""
        checked = [self._checked_entry(entry, i) for i, entry in enumerate(entries)]  # all checked before any is kept
        kept = [entry for entry in checked if float(entry[self.advantage_field]) != 0.0]
        self.entries.extend(kept)
        if len(self.entries) > self.capacity:
            del self.entries[: len(self.entries) - self.capacity]  # FIFO: the oldest go first
        return len(kept)

    def advantages(self) -> Tensor:
        """[N] float64 advantages of the stored entries, oldest first."""
        return torch.tensor([float(entry[self.advantage_field]) for entry in self.entries], dtype=torch.float64)

    def probabilities(self) -> Tensor:
        """[N] float64 replay probabilities of the stored entries (``ssr_probabilities`` with this alpha)."""
        if not self.entries:
            raise ValueError("the replay buffer is empty; add samples before asking for probabilities")
        return ssr_probabilities(self.advantages(), self.alpha)

    def sample(self, k: int, generator: torch.Generator) -> list[dict[str, Tensor]]:
        """Draw ``k`` distinct entries, each draw in proportion to |A|^alpha among those not yet drawn.

        Deterministic given ``generator``'s state (a CPU ``torch.Generator``). Returns clones of the drawn
        entries in draw order; the entries stay in the buffer.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        if k > len(self.entries):
            raise ValueError(
                f"cannot draw {k} distinct samples from a replay buffer holding {len(self.entries)}; "
                f"draw min(k, len(buffer)) instead"
            )
        if k == 0:
            return []
        probabilities = self.probabilities()  # [N] float64
        if int((probabilities > 0).sum()) < k:  # only when alpha is so large that small |A|^alpha underflow
            raise ValueError(
                f"only {int((probabilities > 0).sum())} entries have a non-zero replay probability at alpha = "
                f"{self.alpha}; lower alpha or draw fewer"
            )
        indices = torch.multinomial(probabilities, k, replacement=False, generator=generator)  # [k]
        return [{name: value.clone() for name, value in self.entries[i].items()} for i in indices.tolist()]

    def state_dict(self) -> dict[str, Tensor]:
        """Flat dict of tensors (safetensors-saveable), oldest entry first:

        ``capacity`` and ``size`` (0-D int64), ``scalar/NAME`` [N] per scalar field, ``sequence/NAME/values``
        [N, L_max] right-padded with 0 and ``sequence/NAME/lengths`` [N] int64 per sequence field.
        """
        size = len(self.entries)
        state = {
            "capacity": torch.tensor(self.capacity, dtype=torch.int64),
            "size": torch.tensor(size, dtype=torch.int64),
        }
        for name, dtype in self.scalar_fields.items():
            state[f"scalar/{name}"] = (
                torch.stack([entry[name] for entry in self.entries]) if size else torch.zeros(0, dtype=dtype)
            )
        for name, dtype in self.sequence_fields.items():
            if self._is_constant(name):
                continue  # rebuilt from its scalar on loading
            lengths = torch.tensor([entry[name].numel() for entry in self.entries], dtype=torch.int64)  # [N]
            longest = int(lengths.max()) if size else 0
            values = torch.zeros(size, longest, dtype=dtype)  # [N, L_max]
            for row, entry in enumerate(self.entries):
                values[row, : entry[name].numel()] = entry[name]
            state[f"sequence/{name}/values"] = values
            state[f"sequence/{name}/lengths"] = lengths
        return state

    def _is_constant(self, name: str) -> bool:
        """Whether sequence field `name` is, in every entry, its scalar repeated over its length-giving field."""
        if name not in self.constant_fields:
            return False
        scalar, like = self.constant_fields[name]
        return all(
            entry[name].numel() == entry[like].numel() and bool((entry[name] == entry[scalar]).all())
            for entry in self.entries
        )

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the entries saved by ``state_dict``; refuses a state from a buffer with other fields,
        dtypes or capacity (a different capacity would evict differently, so the resumed run would differ)."""
        expected = {"capacity", "size"}
        expected |= {f"scalar/{name}" for name in self.scalar_fields}
        left_out = {
            name for name in self.constant_fields if f"sequence/{name}/values" not in state
        }  # saved as their scalar repeated
        stored = [name for name in self.sequence_fields if name not in left_out]
        expected |= {f"sequence/{name}/{part}" for name in stored for part in ("values", "lengths")}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"replay buffer state does not match this buffer's fields: missing {missing}, unexpected {unexpected}"
            )
        capacity, size = int(state["capacity"]), int(state["size"])
        if capacity != self.capacity:
            raise ValueError(
                f"replay buffer state was saved with capacity {capacity}, this buffer has {self.capacity}; "
                "resume with the same replay size"
            )
        if not 0 <= size <= capacity:
            raise ValueError(f"replay buffer state has size {size}, outside [0, {capacity}]")
        columns: dict[str, list[Tensor]] = {}
        for name, dtype in self.scalar_fields.items():
            column = state[f"scalar/{name}"]
            if column.dtype != dtype or tuple(column.shape) != (size,):
                raise ValueError(
                    f"scalar/{name} must be [{size}] of {dtype}, got {tuple(column.shape)} of {column.dtype}"
                )
            columns[name] = list(column.unbind(0))
        for name in stored:
            dtype = self.sequence_fields[name]
            values, lengths = state[f"sequence/{name}/values"], state[f"sequence/{name}/lengths"]
            if values.dtype != dtype or values.dim() != 2 or values.shape[0] != size or tuple(lengths.shape) != (size,):
                raise ValueError(
                    f"sequence/{name} must be values [{size}, L] of {dtype} and lengths [{size}], got "
                    f"{tuple(values.shape)} of {values.dtype} and {tuple(lengths.shape)}"
                )
            if size and (int(lengths.min()) < 0 or int(lengths.max()) > values.shape[1]):
                raise ValueError(f"sequence/{name}/lengths must lie in [0, {values.shape[1]}]")
            columns[name] = [values[row, : int(lengths[row])] for row in range(size)]
        entries = [{name: columns[name][row].clone() for name in columns} for row in range(size)]
        for name in left_out:
            scalar, like = self.constant_fields[name]
            dtype = self.sequence_fields[name]
            for entry in entries:
                entry[name] = entry[scalar].to(dtype).expand(entry[like].numel()).clone()
        if any(float(entry[self.advantage_field]) == 0.0 for entry in entries):
            raise ValueError(f"replay buffer state holds an entry with {self.advantage_field} 0, which is never stored")
        self.entries = entries
