"""SAQ staircase KV cache: full precision for the newest tokens, then fewer bits as tokens age.

The cache of one sequence (per layer) is a residual of up to `stage` full-precision tokens and a list
of closed stages of exactly `stage` tokens. When the residual fills it closes as a stage at the top
stair's width; every closed stage then moves down the stairs by age: with the default schedule
`8:1,4:4,2` the newest closed stage is 8-bit, the next four are 4-bit and all older ones 2-bit.

Quantization (KIVI-style, asymmetric: value = min + code * scale, codes in [0, 2^bits - 1]):
- K per channel: min and scale per channel over the stage's tokens (K's outlier channels get their own
  range; no smoothing needed).
- V per token: min and scale per group of `v_group` channels.
Mins and scales are fp16; codes are packed 8 // bits per byte. Demotion re-quantizes from what the
stage holds (its dequantized codes), never from the full-precision values, which are gone once a stage
closes: the error compounds down the stairs, and the accuracy harness measures exactly that.

This module is the specification (torch, any device): `SaqCache` holds real packed codes, so
`nbytes()` is the memory the format takes, and `attend()` is the attention the kernels must match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.kv_formats import SAQ_CLIP_RATIOS, SaqFormat

__all__ = ["SaqSchedule", "SaqCache", "quantize_asym", "dequantize_asym"]


@dataclass(frozen=True)
class SaqSchedule:
    """stage: tokens per stage; stairs: (bits, stages) from the newest closed stage down, the last
    stair's count 0 meaning "all older"; v_group: V channels per (min, scale)."""

    stage: int = 64
    stairs: tuple[tuple[int, int], ...] = ((8, 1), (4, 4), (2, 0))
    v_group: int = 32
    sink: int = 0  # the oldest `sink` stages stay at the top stair's width (attention sinks)
    rotate: str = ""  # "k", "v" or "kv": rows rotated per head by a Hadamard matrix before quantizing
    clip: int = 0  # stairs of at most this many bits search a clipped range (quantize_asym)
    # the first `sink_tokens` tokens kept fp16 beside the staircase (token attention sinks); stage 0 is
    # quantized with row sink_tokens standing in for them (sink_stand_in), so they do not stretch its ranges
    sink_tokens: int = 0

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        stage: int = 64,
        v_group: int = 32,
        sink: int = 0,
        rotate: str = "",
        clip: int = 0,
        sink_tokens: int = 0,
    ) -> SaqSchedule:
        """'8:1,4:4,2' -> stairs ((8, 1), (4, 4), (2, 0))."""
        stairs = []
        for i, part in enumerate(p.strip() for p in text.split(",")):
            bits, _, count = part.partition(":")
            last = i == len(text.split(",")) - 1
            try:
                stairs.append((int(bits), int(count) if count else 0))
            except ValueError:
                raise ValueError(
                    f"SAQ stair {part!r}: write BITS:STAGES (e.g. 8:1), the last one BITS"
                ) from None
            if not last and stairs[-1][1] <= 0:
                raise ValueError(f"SAQ stair {part!r}: every stair but the last needs a stage count >= 1")
        schedule = cls(
            stage=stage, stairs=tuple(stairs), v_group=v_group, sink=sink, rotate=rotate, clip=clip,
            sink_tokens=sink_tokens,
        )  # fmt: skip
        schedule.validate()
        return schedule

    def validate(self) -> None:
        widths = [bits for bits, _ in self.stairs]
        if any(b not in (8, 4, 2) for b in widths):
            raise ValueError(f"SAQ stair widths {widths}: each must be 8, 4 or 2 bits")
        if widths != sorted(widths, reverse=True):
            raise ValueError(f"SAQ stair widths {widths} must not increase with age")
        if self.stage < 2:
            raise ValueError(f"SAQ stage of {self.stage} tokens: use at least 2")
        if not 0 <= self.sink_tokens < self.stage:
            raise ValueError(f"SAQ sink_tokens={self.sink_tokens}: 0 up to the stage size - 1")

    def bits_at(self, age: int, index: int = 1 << 30) -> int:
        """Width of the closed stage `age` stages old (0 = newest), `index` stages from the oldest."""
        if index < self.sink:
            return self.stairs[0][0]
        for bits, count in self.stairs:
            if count == 0 or age < count:
                return bits
            age -= count
        return self.stairs[-1][0]

    def text(self) -> str:
        return ",".join(f"{b}:{c}" if c else str(b) for b, c in self.stairs)


def sink_stand_in(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Stage 0's rows [stage, W] as its record quantizes them when the first n tokens are token sinks
    (kept fp16 elsewhere): row n's values in rows 0..n-1 (a copy). Another row of the stage leaves K's
    per-channel ranges as the other rows give them, and is exact in any implementation."""
    if not n:
        return rows
    rows = rows.clone()
    rows[:n] = rows[n]
    return rows


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] in [0, 2^bits) -> [..., n * bits / 8] bytes (first code in the low bits)."""
    per = 8 // bits
    c = codes.to(torch.uint8).unflatten(-1, (-1, per))
    packed = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        packed |= c[..., i] << (bits * i)
    return packed


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.stack([(packed >> (bits * i)) & mask for i in range(per)], -1).flatten(-2)


def quantize_asym(
    x: torch.Tensor, bits: int, dim: int, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of x (float) with one (lo, scale) over `dim`: (codes uint8 in
    [0, 2^bits), lo fp16, scale fp16), lo/scale keeping `dim` as size 1.

    Without clip the range is min..max. With clip each group tries the ranges r * min .. r * max for r in
    SAQ_CLIP_RATIOS and keeps the one whose dequantized values have the smallest squared error (fp32 sum
    over the group; on a tie the larger r): at 2 bits the outliers' range costs the bulk of the values
    more than clipping the outliers does."""
    levels = (1 << bits) - 1
    xf = x.float()
    low, high = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    best = None
    for r in SAQ_CLIP_RATIOS if clip else (1.0,):
        lo = (low * r).half()
        scale = ((high * r - lo.float()) / levels).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round((xf - lo.float()) / scale.float()).clamp(0, levels)
        if not clip:
            return codes.to(torch.uint8), lo, scale
        err = ((lo.float() + codes * scale.float() - xf) ** 2).sum(dim, keepdim=True)
        if best is None:
            best = [err, codes, lo, scale]
            continue
        better = err < best[0]
        best = [torch.where(better, new, old) for new, old in zip((err, codes, lo, scale), best)]
    return best[1].to(torch.uint8), best[2], best[3]


def dequantize_asym(codes: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return lo.float() + codes.float() * scale.float()


class _Stage:
    """A closed stage: K [T, W] quantized per channel, V [T, W] per token per group."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, bits: int, v_group: int, clip: int = 0) -> None:
        self.bits, self.tokens, self.width, self.v_group, self.clip = (
            bits,
            k.shape[0],
            k.shape[1],
            v_group,
            clip,
        )
        k_codes, self.k_lo, self.k_scale = quantize_asym(k, bits, dim=0, clip=bits <= clip)
        v_codes, self.v_lo, self.v_scale = quantize_asym(
            v.unflatten(-1, (-1, v_group)), bits, dim=-1, clip=bits <= clip
        )
        self.k_codes = _pack(k_codes.transpose(0, 1), bits)  # [W, T * bits / 8]: channels are rows
        self.v_codes = _pack(v_codes.flatten(-2), bits)  # [T, W * bits / 8]
        self._keys = self._values = None

    def keys(self) -> torch.Tensor:
        if self._keys is None:  # memo: a stage's codes never change, only its successor replaces it
            codes = _unpack(self.k_codes, self.bits).transpose(0, 1)
            self._keys = dequantize_asym(codes, self.k_lo, self.k_scale)
        return self._keys

    def values(self) -> torch.Tensor:
        if self._values is None:
            codes = _unpack(self.v_codes, self.bits).unflatten(-1, (-1, self.v_group))
            self._values = dequantize_asym(codes, self.v_lo, self.v_scale).flatten(-2)
        return self._values

    def demote(self, bits: int) -> _Stage:
        """The same tokens at `bits`, re-quantized from what this stage holds."""
        return _Stage(self.keys(), self.values(), bits, self.v_group, self.clip)

    def nbytes(self) -> int:
        tensors = (self.k_codes, self.v_codes, self.k_lo, self.k_scale, self.v_lo, self.v_scale)
        return sum(t.numel() * t.element_size() for t in tensors)


class SaqCache:
    """One layer's staircase cache for one sequence. K and V rows are [Hkv * D] (K after RoPE)."""

    def __init__(
        self,
        schedule: SaqSchedule,
        width: int,
        dtype: torch.dtype = torch.float16,
        head_dim: int | None = None,
    ) -> None:
        schedule.validate()
        self.head_dim = head_dim
        self.rotation = self._rotation(head_dim) if schedule.rotate and head_dim else None
        if width % schedule.v_group:
            raise ValueError(f"KV width {width} is not a multiple of the SAQ V group {schedule.v_group}")
        if (schedule.stage * min(b for b, _ in schedule.stairs)) % 8:
            raise ValueError(f"SAQ stage of {schedule.stage} tokens does not pack into whole bytes")
        self.schedule, self.width, self.dtype = schedule, width, dtype
        self.stages: list[_Stage] = []  # oldest first
        self.residual_k = torch.empty(0, width, dtype=dtype)
        self.residual_v = torch.empty(0, width, dtype=dtype)
        self.demotions = 0
        self.sink_k = self.sink_v = None  # the first schedule.sink_tokens rows, fp16, once stage 0 closes

    def __len__(self) -> int:
        return len(self.stages) * self.schedule.stage + self.residual_k.shape[0]

    def _rotation(self, head_dim: int) -> torch.Tensor:
        h = torch.ones(1, 1)
        while h.shape[0] < head_dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
        if h.shape[0] != head_dim:
            raise ValueError(f"SAQ rotation needs a power-of-two head_dim, not {head_dim}")
        return h / math.sqrt(head_dim)

    def _rotate(self, x: torch.Tensor, which: str, inverse: bool = False) -> torch.Tensor:
        if which not in self.schedule.rotate or self.head_dim is None:
            return x
        r = self.rotation.T if inverse else self.rotation
        return (x.float().unflatten(-1, (-1, self.head_dim)) @ r).flatten(-2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add tokens [n, W]; stages close (and older ones move down the stairs) as the residual fills."""
        k, v = k.to(self.dtype), v.to(self.dtype)
        while k.shape[0]:
            room = self.schedule.stage - self.residual_k.shape[0]
            self.residual_k = torch.cat([self.residual_k, k[:room]])
            self.residual_v = torch.cat([self.residual_v, v[:room]])
            k, v = k[room:], v[room:]
            if self.residual_k.shape[0] == self.schedule.stage:
                self._close()

    def _close(self) -> None:
        top = self.schedule.bits_at(0)
        k, v = self._rotate(self.residual_k, "k"), self._rotate(self.residual_v, "v")
        n = self.schedule.sink_tokens
        if n and not self.stages:  # stage 0: its first n rows stay fp16; row n stands in for them
            self.sink_k, self.sink_v = self.residual_k[:n].clone(), self.residual_v[:n].clone()
            k, v = sink_stand_in(k, n), sink_stand_in(v, n)
        self.stages.append(_Stage(k, v, top, self.schedule.v_group, self.schedule.clip))
        self.residual_k = self.residual_k[:0]
        self.residual_v = self.residual_v[:0]
        for age, i in enumerate(range(len(self.stages) - 1, -1, -1)):
            bits = self.schedule.bits_at(age, i)
            if self.stages[i].bits != bits:
                self.stages[i] = self.stages[i].demote(bits)
                self.demotions += 1

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens, oldest first, as float32 [T, W]: what attention reads."""
        ks = [self._rotate(s.keys(), "k", True) for s in self.stages] + [self.residual_k.float()]
        vs = [self._rotate(s.values(), "v", True) for s in self.stages] + [self.residual_v.float()]
        k, v = torch.cat(ks), torch.cat(vs)
        if self.sink_k is not None:
            n = self.sink_k.shape[0]
            k[:n], v[:n] = self.sink_k.float(), self.sink_v.float()
        return k, v

    def nbytes(self) -> int:
        residual = 2 * self.residual_k.numel() * self.residual_k.element_size()
        sink = 0 if self.sink_k is None else 2 * self.sink_k.numel() * self.sink_k.element_size()
        return residual + sink + sum(s.nbytes() for s in self.stages)

    def bits_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.stages:
            counts[f"int{s.bits}"] = counts.get(f"int{s.bits}", 0) + s.tokens
        counts["fp"] = self.residual_k.shape[0]
        return counts


def attend(q, k_new, v_new, cache: SaqCache, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Causal attention of q [S, Hq * D] for S new tokens (k_new, v_new [S, W], not yet appended) over
    the cache plus themselves at full precision, as a decode step sees its own token before the
    residual closes: float32 [S, Hq * D]."""
    past = len(cache)
    k, v = cache.keys_values()
    k = torch.cat([k, k_new.to(cache.dtype).float()])
    v = torch.cat([v, v_new.to(cache.dtype).float()])
    S, T = q.shape[0], k.shape[0]
    D = q.shape[1] // num_heads
    group = num_heads // num_kv_heads
    qh = q.float().view(S, num_heads, D).transpose(0, 1)  # [Hq, S, D]
    kh = k.view(T, num_kv_heads, D).transpose(0, 1).repeat_interleave(group, 0)
    vh = v.view(T, num_kv_heads, D).transpose(0, 1).repeat_interleave(group, 0)
    scores = qh @ kh.transpose(1, 2) / math.sqrt(D)
    rows = torch.arange(past, past + S).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(T).unsqueeze(0) > rows, float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(0, 1).flatten(1)


# ----------------------------------------------------------------------------------------------
# The served format: the FlashAttention node over a paged staircase (kernels/kv_formats.SaqFormat)


def _field(record: torch.Tensor, fmt: SaqFormat, bits: int, name: str, dtype=torch.float16) -> torch.Tensor:
    offset, size = fmt.record_fields(bits)[name]
    return record[offset : offset + size].view(dtype)


def encode_record(k: torch.Tensor, v: torch.Tensor, fmt: SaqFormat, bits: int) -> torch.Tensor:
    """One closed stage (K, V float [stage, width]) -> its record, uint8 [fmt.record_bytes(bits)]."""
    clip = fmt.clipped(bits)
    k_codes, k_lo, k_scale = quantize_asym(k, bits, dim=0, clip=clip)
    v_codes, v_lo, v_scale = quantize_asym(v.unflatten(-1, (-1, fmt.v_group)), bits, dim=-1, clip=clip)
    parts = {
        "k_lo": k_lo.reshape(-1), "k_scale": k_scale.reshape(-1),
        "v_lo": v_lo.reshape(-1), "v_scale": v_scale.reshape(-1),
        "k_codes": _pack(k_codes, bits).reshape(-1), "v_codes": _pack(v_codes.flatten(-2), bits).reshape(-1),
    }  # fmt: skip
    record = torch.zeros(fmt.record_bytes(bits), dtype=torch.uint8)
    for name, tensor in parts.items():
        offset, size = fmt.record_fields(bits)[name]
        record[offset : offset + size] = tensor.contiguous().view(torch.uint8)
    return record


def decode_record(record: torch.Tensor, fmt: SaqFormat, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A record -> (K, V) float32 [stage, width]: lo + code * scale."""
    S, W, g = fmt.stage, fmt.width, fmt.v_group
    k_codes = _unpack(_field(record, fmt, bits, "k_codes", torch.uint8).view(S, -1), bits)
    v_codes = _unpack(_field(record, fmt, bits, "v_codes", torch.uint8).view(S, -1), bits)
    k = dequantize_asym(k_codes, _field(record, fmt, bits, "k_lo"), _field(record, fmt, bits, "k_scale"))
    v_lo = _field(record, fmt, bits, "v_lo").view(S, W // g, 1)
    v_scale = _field(record, fmt, bits, "v_scale").view(S, W // g, 1)
    v = dequantize_asym(v_codes.view(S, W // g, g), v_lo, v_scale).flatten(-2)
    return k, v


class _SlotView:
    """Where each closed stage of one sequence lives: a ring entry of its slot, or a paged block."""

    def __init__(
        self, pool: torch.Tensor, slots: torch.Tensor, slot: int, table: torch.Tensor, fmt: SaqFormat
    ):
        self.pool, self.slot, self.table, self.fmt = pool, slots[slot], table, fmt

    def record(self, stair: int, stage: int) -> torch.Tensor:
        """The bytes (a view) of logical stage `stage` on stair `stair` (a sink stage: its sink record)."""
        bits, count = self.fmt.stairs[stair]
        if stage < self.fmt.sink:
            size = self.fmt.record_bytes(self.fmt.stairs[0][0])
            return self.slot[self.fmt.sink_offset + stage * size :][:size]
        if stair == len(self.fmt.stairs) - 1:
            return self.pool[int(self.table[stage])]
        size = self.fmt.record_bytes(bits)
        offset = self.fmt.ring_offset(stair) + (stage % count) * size
        return self.slot[offset : offset + size]

    def tail(self, which: int) -> torch.Tensor:
        """fp16 [stage, width] view of the open stage's K (0) or V (1)."""
        size = self.fmt.tail_bytes
        return self.slot[which * size : (which + 1) * size].view(torch.float16).view(self.fmt.stage, -1)

    def sink_rows(self, which: int) -> torch.Tensor:
        """fp16 [sink_tokens, width] view of the token sinks' K (0) or V (1)."""
        size = 2 * self.fmt.sink_tokens * self.fmt.width
        start = self.fmt.sink_rows_offset + which * size
        return self.slot[start : start + size].view(torch.float16).view(self.fmt.sink_tokens, -1)

    def close(self, stage: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Logical stage `stage` closes with (k, v) [stage, width]: older stages leaving a stair move one
        down (bottom first, so each ring entry is free before it is written), then the new one takes
        the top stair. A move re-quantizes what the stage holds; equal widths copy the bytes. Stage 0's
        first sink_tokens rows go to the sink rows, and its record holds sink_stand_in's rows."""
        fmt, top = self.fmt, len(self.fmt.stairs) - 1
        first_age = [sum(c for _, c in fmt.stairs[:i]) for i in range(len(fmt.stairs))]
        for i in range(top - 1, -1, -1):
            leaving = stage - first_age[i] - fmt.stairs[i][1]  # its age becomes first_age[i + 1]
            if leaving < fmt.sink:  # none yet, or a sink stage: those stay where they are
                continue
            src, dst = self.record(i, leaving), self.record(i + 1, leaving)
            (bits, _), (low, _) = fmt.stairs[i], fmt.stairs[i + 1]
            dst.copy_(src if bits == low else encode_record(*decode_record(src, fmt, bits), fmt, low))
        if stage == 0 and fmt.sink_tokens:
            self.sink_rows(0).copy_(k[: fmt.sink_tokens])
            self.sink_rows(1).copy_(v[: fmt.sink_tokens])
            k, v = sink_stand_in(k, fmt.sink_tokens), sink_stand_in(v, fmt.sink_tokens)
        self.record(0, stage).copy_(encode_record(k, v, fmt, fmt.stairs[0][0]))

    def keys_values(self, closed: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V float32 [past, width] of positions [0, past) as the cache holds them: closed stages
        dequantized from their stair (the token sinks' rows from the slot), the open stage's fp16 rows."""
        ks, vs = [], []
        for j in range(closed):
            stair = 0 if j < self.fmt.sink else self.fmt.stair_of_age(closed - 1 - j)
            k, v = decode_record(self.record(stair, j), self.fmt, self.fmt.stairs[stair][0])
            ks.append(k)
            vs.append(v)
        rows = past - closed * self.fmt.stage
        ks.append(self.tail(0)[: max(rows, 0)].float())
        vs.append(self.tail(1)[: max(rows, 0)].float())
        k, v = torch.cat(ks)[:past], torch.cat(vs)[:past]
        if closed and self.fmt.sink_tokens:
            k[: self.fmt.sink_tokens], v[: self.fmt.sink_tokens] = (
                self.sink_rows(0).float(),
                self.sink_rows(1).float(),
            )
        return k, v


def paged_attention_saq_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pool: torch.Tensor,
    kv_slots: torch.Tensor,
    block_table: torch.Tensor,
    past_lens: torch.Tensor,
    total_lens: torch.Tensor,
    seq_slots: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    fmt: SaqFormat,
    causal: bool = True,
    sliding_window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FlashAttention node with an SAQ staircase cache. q [B, S, Hq * D], k/v [B, S, width]; row b's
    first total - past tokens are new (positions past..total-1), the rest padding (not written).
    kv_pool uint8 [NB, fmt.block_bytes] (bottom stair, block_table [B, max_blocks] names logical stage
    j's block), kv_slots uint8 [NS, fmt.slot_bytes] (row b's slot: seq_slots[b]).

    Write: the open stage's earlier rows (the slot's tail) and the new tokens are one run from the first
    open position; every stage the run completes closes (`_SlotView.close`), the rest becomes the tail.
    Read: positions >= past use the new K/V as given (rounded to fp16, as the tail holds them);
    positions < past the cache as it was before this call's write (so a kernel attends, then writes).
    Returns (o, kv_pool, kv_slots) (copies)."""
    B, S, _ = q.shape
    D = q.shape[-1] // num_heads
    kv_pool, kv_slots = kv_pool.clone(), kv_slots.clone()
    out = torch.zeros(B, S, num_heads * D, dtype=torch.float32)
    for b in range(B):
        past, total = int(past_lens[b]), int(total_lens[b])
        view = _SlotView(kv_pool, kv_slots, int(seq_slots[b]), block_table[b], fmt)
        k_new, v_new = k[b, : total - past].half().float(), v[b, : total - past].half().float()
        first = past // fmt.stage
        old_k, old_v = view.keys_values(first, past)
        run_k = torch.cat([view.tail(0)[: past - first * fmt.stage].float(), k_new])
        run_v = torch.cat([view.tail(1)[: past - first * fmt.stage].float(), v_new])
        closed = total // fmt.stage
        for j in range(first, closed):
            rows = slice((j - first) * fmt.stage, (j - first + 1) * fmt.stage)
            view.close(j, run_k[rows], run_v[rows])
        rest = total - closed * fmt.stage
        if rest:
            view.tail(0)[:rest] = run_k[-rest:].half()
            view.tail(1)[:rest] = run_v[-rest:].half()
        keys = torch.cat([old_k, k_new]).view(total, num_kv_heads, D).transpose(0, 1)  # [Hkv, T, D]
        values = torch.cat([old_v, v_new]).view(total, num_kv_heads, D).transpose(0, 1)
        qb = q[b].float().view(S, num_kv_heads, num_heads // num_kv_heads, D).permute(1, 2, 0, 3)
        scores = torch.einsum("hgsd,htd->hgst", qb, keys) * scale
        pos = torch.arange(S).view(S, 1) + past
        key = torch.arange(total).view(1, total)
        visible = torch.ones(S, total, dtype=torch.bool)
        if causal:
            visible &= key <= pos
        if sliding_window > 0:
            visible &= pos - key < sliding_window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        ob = torch.einsum("hgst,htd->hgsd", probs, values).reshape(num_heads, S, D)
        out[b] = ob.transpose(0, 1).reshape(S, num_heads * D)
    return out.to(q.dtype), kv_pool, kv_slots
