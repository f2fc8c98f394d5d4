"""KV-cache storage formats: names and sizes only (no torch), shared by kernels, exporter and runtime.

The quantized formats' arithmetic is specified in kernels/kv_quant.py.
"""

from __future__ import annotations

from dataclasses import dataclass

KV_QUANT_FORMATS = {"int8": (8, 127), "int4": (4, 7)}  # format -> (bits, qmax)
INT4_GROUP = 32  # int4 scales cover 32 channels; int8 scales one head


def group_size(kv_format: str, head_dim: int) -> int:
    """Channels per scale."""
    return head_dim if kv_format == "int8" else INT4_GROUP


def code_width(kv_format: str, width: int) -> int:
    """Bytes of codes per token row of `width` channels."""
    return width if kv_format == "int8" else width // 2


# ----------------------------------------------------------------------------------------------
# SAQ staircase as a served format (kernels/kv_saq.py specifies the arithmetic)

SAQ_FORMAT = "saq"
# The bar, dPPL <= 0.3 at >= 5x less KV than fp16 at 4k with the slot (the fp16 open stage) counted:
# 0.299 at 5.001x (benchmarks/results/kv_accuracy_saq_served.json, 53k tokens). 128-token stages
# ("8:1,4:7,2;stage=128;v_group=64;sink=1;clip=2") keep more accuracy (0.170) at 4.34x.
SAQ_DEFAULT = "8:1,4:11,2;stage=64;v_group=64;sink=0;clip=2;sink_tokens=3"
SAQ_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


@dataclass(frozen=True)
class SaqFormat:
    """A staircase: closed stages of `stage` tokens step down `stairs` [(bits, stages), ..., (bits, 0)]
    as they age; the newest (open) stage stays fp16. One token's K (and V) row has `width` channels.
    The oldest `sink` stages stay on the top stair for good (attention sinks). The first `sink_tokens`
    tokens stay fp16 for good (token sinks): once stage 0 closes they are read from the slot's sink rows,
    and stage 0's record holds row `sink_tokens`'s values in their place (so they do not stretch its
    ranges). Stairs of at most `clip` bits choose each group's range by a clipping search
    (kernels/kv_saq.quantize_asym); 0 = min..max.

    Memory, per layer (uint8 arrays; fp16 fields little-endian inside them):
      pool  [num_blocks, block_bytes]: one record per block of the bottom stair (paged: block table)
      slots [num_slots, slot_bytes]:   per sequence, the open stage's K and V (fp16 [stage, width] each),
                                       the token sinks' K and V (fp16 [sink_tokens, width] each),
                                       then `sink` records at the top stair's width (logical stages
                                       0..sink-1), then each upper stair's ring of `count` records;
                                       logical stage j of stair i lives in ring entry j % count
    A record holds one closed stage at `bits`: fp16 k_lo[width], k_scale[width] (K per channel over
    the stage's tokens), fp16 v_lo[stage, width / v_group], v_scale[same] (V per token per group), then
    uint8 k_codes[stage, width * bits / 8], v_codes[same] (codes packed along channels, first channel
    in the low bits). value = lo + code * scale.
    """

    stairs: tuple[tuple[int, int], ...]
    stage: int
    v_group: int
    width: int
    sink: int = 0
    clip: int = 0
    sink_tokens: int = 0

    @classmethod
    def parse(cls, spec: str, width: int) -> SaqFormat:
        """'8:1,4:4,2;stage=64;v_group=32' (any part after the stairs optional)."""
        stairs_text, *options = [p.strip() for p in (spec or SAQ_DEFAULT).split(";")]
        values = {"stage": 64, "v_group": 32, "sink": 0, "clip": 0, "sink_tokens": 0}
        for option in options:
            key, _, value = option.partition("=")
            if key not in values or not value.strip().isdigit():
                raise ValueError(
                    f"SAQ option {option!r}: use stage=N, v_group=N, sink=N, clip=BITS or sink_tokens=N"
                )
            values[key] = int(value)
        parts = [p.strip() for p in stairs_text.split(",")]
        stairs = []
        for i, part in enumerate(parts):
            bits, _, count = part.partition(":")
            try:
                stairs.append((int(bits), int(count) if count else 0))
            except ValueError:
                raise ValueError(
                    f"SAQ stair {part!r}: write BITS:STAGES (e.g. 8:1), the last one BITS"
                ) from None
            if (i < len(parts) - 1) != (stairs[-1][1] > 0):
                raise ValueError(
                    f"SAQ stairs {stairs_text!r}: every stair but the last needs BITS:STAGES (stages >= 1), "
                    "the last one is BITS alone (it holds all older stages)"
                )
        fmt = cls(
            tuple(stairs), values["stage"], values["v_group"], width, values["sink"], values["clip"],
            values["sink_tokens"],
        )  # fmt: skip
        fmt.validate()
        return fmt

    def validate(self) -> None:
        widths = [bits for bits, _ in self.stairs]
        if any(b not in (8, 4, 2) for b in widths):
            raise ValueError(f"SAQ stair widths {widths}: each must be 8, 4 or 2 bits")
        if widths != sorted(widths, reverse=True):
            raise ValueError(f"SAQ stair widths {widths} must not increase with age")
        if self.stage < 8 or self.stage % 8:
            raise ValueError(f"SAQ stage of {self.stage} tokens: use a multiple of 8")
        if self.v_group < 1 or self.width % self.v_group:
            raise ValueError(f"SAQ v_group {self.v_group} must divide the KV width {self.width}")
        if self.clip not in (0, 2, 4, 8):
            raise ValueError(f"SAQ clip={self.clip}: 0 (none) or the widest stair to clip (2, 4 or 8)")
        if self.width % 4:
            raise ValueError(f"SAQ needs a KV width divisible by 4, not {self.width}")
        if not 0 <= self.sink_tokens < self.stage:
            raise ValueError(f"SAQ sink_tokens={self.sink_tokens}: use 0 up to stage - 1 ({self.stage - 1})")

    def text(self) -> str:
        tokens = f";sink_tokens={self.sink_tokens}" if self.sink_tokens else ""
        return (
            f"{self.stairs_text};stage={self.stage};v_group={self.v_group};sink={self.sink};clip={self.clip}"
            + tokens
        )

    @property
    def stairs_text(self) -> str:
        return ",".join(f"{b}:{c}" if c else str(b) for b, c in self.stairs)

    # -- byte layout -------------------------------------------------------------------------------

    def record_fields(self, bits: int) -> dict[str, tuple[int, int]]:
        """Field -> (byte offset, bytes) inside one record at `bits`."""
        W, S = self.width, self.stage
        sizes = [
            ("k_lo", 2 * W),
            ("k_scale", 2 * W),
            ("v_lo", 2 * S * (W // self.v_group)),
            ("v_scale", 2 * S * (W // self.v_group)),
            ("k_codes", S * W * bits // 8),
            ("v_codes", S * W * bits // 8),
        ]
        fields, offset = {}, 0
        for name, size in sizes:
            fields[name] = (offset, size)
            offset += size
        return fields

    def record_bytes(self, bits: int) -> int:
        offset, size = self.record_fields(bits)["v_codes"]
        return offset + size

    @property
    def block_bytes(self) -> int:
        """One record of the bottom stair: a paged block."""
        return self.record_bytes(self.stairs[-1][0])

    @property
    def tail_bytes(self) -> int:
        """The open stage's K or V: fp16 [stage, width]."""
        return 2 * self.stage * self.width

    @property
    def sink_rows_offset(self) -> int:
        """Byte offset of the token sinks' K rows (fp16 [sink_tokens, width], then V's) inside a slot."""
        return 2 * self.tail_bytes

    @property
    def sink_offset(self) -> int:
        """Byte offset of the sink records (top stair width, one per sink stage) inside a slot."""
        return self.sink_rows_offset + 4 * self.sink_tokens * self.width

    def ring_offset(self, stair: int) -> int:
        """Byte offset of stair `stair`'s ring inside a slot (stairs above the bottom one)."""
        offset = self.sink_offset + self.sink * self.record_bytes(self.stairs[0][0])
        for bits, count in self.stairs[:stair]:
            offset += count * self.record_bytes(bits)
        return offset

    @property
    def slot_bytes(self) -> int:
        return self.ring_offset(len(self.stairs) - 1)

    def clipped(self, bits: int) -> bool:
        return bits <= self.clip

    def stair_of_age(self, age: int) -> int:
        """Stair index of a closed stage `age` stages old (0 = the newest closed stage). Sink stages
        (logical index < sink) are not on the stairs: they keep their sink record."""
        for i, (_, count) in enumerate(self.stairs):
            if count == 0 or age < count:
                return i
            age -= count
        return len(self.stairs) - 1

    # -- what one sequence holds -------------------------------------------------------------------

    @property
    def upper_stages(self) -> int:
        """Closed stages the stairs above the bottom one hold (their rings' entries), sinks aside."""
        return sum(count for _, count in self.stairs[:-1])

    def bottom_stages(self, tokens: int) -> range:
        """Logical stages on the bottom stair, in paged blocks, once `tokens` tokens are cached: the closed
        stages older than the upper stairs hold, sinks aside. Only those ever touch their block, and a stage
        that reaches the bottom stays there (_SlotView.close), so bottom_stages(n) grows with n."""
        return range(self.sink, max(self.sink, tokens // self.stage - self.upper_stages))

    def slot_ranges(self, tokens: int) -> list[tuple[int, int]]:
        """(byte offset, bytes) of a slot that hold state once `tokens` tokens are cached, ascending, adjacent
        ones merged: the open stage's first tokens % stage rows of K and of V, the token sinks' rows once
        stage 0 has closed, the sink records of closed sink stages, and the ring entries holding a stage.
        The slot's other bytes are not read before they are written."""
        closed, rows = divmod(tokens, self.stage)
        top = self.record_bytes(self.stairs[0][0])
        ranges = [(0, 2 * rows * self.width), (self.tail_bytes, 2 * rows * self.width)]
        ranges.append((self.sink_rows_offset, 4 * self.sink_tokens * self.width if closed else 0))
        ranges.append((self.sink_offset, min(closed, self.sink) * top))
        first_age = 0
        for i, (bits, count) in enumerate(self.stairs[:-1]):
            size = self.record_bytes(bits)
            for age in range(first_age, first_age + count):  # logical stage closed - 1 - age, if any
                if closed - 1 - age >= self.sink:
                    ranges.append((self.ring_offset(i) + (closed - 1 - age) % count * size, size))
            first_age += count
        merged: list[tuple[int, int]] = []
        for offset, size in sorted(r for r in ranges if r[1]):
            if merged and sum(merged[-1]) == offset:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((offset, size))
        return merged

    def handoff_bytes(self, tokens: int) -> int:
        """Bytes of one layer that hold a `tokens`-token cache: its bottom-stair records and the slot's
        bytes in use (slot_ranges). What a prefill -> decode handoff moves."""
        slot = sum(size for _, size in self.slot_ranges(tokens))
        return len(self.bottom_stages(tokens)) * self.block_bytes + slot
