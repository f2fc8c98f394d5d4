// The SAQ staircase's format, for the native FlashAttentionSaq kernel (saq_cpu.cc, which alone includes it): the
// spec text parsed as kernels/kv_formats.py's SaqFormat.parse does, the byte layout of records and slots, and
// the quantization of records, encoded and decoded exactly as kernels/kv_saq.py does
// (tests/kernels/test_attention_cpu_saq.py compares the pools byte for byte where no stair clips).
//
// The header reads top to bottom: the format -> quantization (groups, then records). Numerics and vector types
// come from fastattention_cpu.h; everything lives in namespace fastattention and is inline, as there.
#pragma once

#include "fastattention_cpu.h"

#include <iterator>

namespace fastattention {

// ------------------------------------------------------------------------------------------------ the format

constexpr double kClipRatios[] = {1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5};  // SAQ_CLIP_RATIOS

// kernels/kv_formats.py, SaqFormat: stairs (bits, stages) from the newest closed stage down, the last one's
// stages 0 ("all older"); `stage` tokens per closed stage; V lo/scale per `v_group` channels; the oldest `sink`
// stages stay on the top stair for good; stairs of <= `clip` bits search a clipped range; the first
// `sink_tokens` tokens stay fp16 for good (token sinks: read from the slot's sink rows once stage 0 has closed,
// row sink_tokens standing in for them in stage 0's record). The byte layout needs the row width W: set_width(W)
// computes it for a call.
struct SaqFormat {
  std::vector<int> bits;
  std::vector<int64_t> stages;
  int64_t stage = 64, v_group = 32, sink = 0, clip = 0, sink_tokens = 0;
  std::string spec;  // as given, for messages
  // layout (set_width)
  int64_t width = 0, groups = 0;  // channels of a K or V row; V groups per row
  std::vector<int64_t> first_age;  // age (0 = newest closed stage) of each stair's first stage
  std::vector<int64_t> ring;       // byte offset of each upper stair's ring in a slot (the last entry: slot_bytes)

  size_t top() const { return bits.size() - 1; }  // index of the bottom stair (the paged one)
  // Record fields (offsets in bytes): fp16 k_lo[W], k_scale[W], v_lo[stage, groups], v_scale[same], then
  // k_codes and v_codes [stage, W * bits / 8] (packed along channels, first channel in the low bits).
  int64_t k_lo() const { return 0; }
  int64_t k_scale() const { return 2 * width; }
  int64_t v_lo() const { return 4 * width; }
  int64_t v_scale() const { return 4 * width + 2 * stage * groups; }
  int64_t k_codes() const { return 4 * width + 4 * stage * groups; }
  int64_t code_row(int b) const { return width * b / 8; }  // bytes of one token's codes
  int64_t v_codes(int b) const { return k_codes() + stage * code_row(b); }
  int64_t record_bytes(int b) const { return v_codes(b) + stage * code_row(b); }
  int64_t block_bytes() const { return record_bytes(bits.back()); }
  int64_t tail_bytes() const { return 2 * stage * width; }  // the open stage's K (then V): fp16 [stage, W]
  int64_t sink_rows_offset() const { return 2 * tail_bytes(); }  // the token sinks' K (then V): [sink_tokens, W]
  int64_t sink_offset() const { return sink_rows_offset() + 4 * sink_tokens * width; }  // the sink records
  int64_t slot_bytes() const { return ring.back(); }
  bool clipped(int b) const { return b <= clip; }

  void set_width(int64_t W) {
    width = W;
    groups = W / v_group;
    first_age.assign(bits.size(), 0);
    for (size_t i = 1; i < bits.size(); ++i) first_age[i] = first_age[i - 1] + stages[i - 1];
    ring.assign(bits.size(), sink_offset() + sink * record_bytes(bits[0]));
    for (size_t i = 1; i < bits.size(); ++i) ring[i] = ring[i - 1] + stages[i - 1] * record_bytes(bits[i - 1]);
  }

  // Stair of a closed stage `age` stages old (sink stages are not on the stairs: see Job::record).
  size_t stair_of_age(int64_t age) const {
    for (size_t i = 0; i < bits.size(); ++i) {
      if (stages[i] == 0 || age < stages[i]) return i;
      age -= stages[i];
    }
    return top();
  }
};

inline std::string trim(const std::string& s) {
  const char* space = " \t\n\r\f\v";
  const size_t a = s.find_first_not_of(space);
  return a == std::string::npos ? std::string() : s.substr(a, s.find_last_not_of(space) - a + 1);
}

inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t end; (end = s.find(sep, start)) != std::string::npos; start = end + 1)
    parts.push_back(s.substr(start, end - start));
  parts.push_back(s.substr(start));
  return parts;
}

// A non-negative decimal integer (surrounding spaces allowed, as Python's int()).
inline bool parse_count(const std::string& text, int64_t& out) {
  const std::string t = trim(text);
  if (t.empty() || t.size() > 9 || t.find_first_not_of("0123456789") != std::string::npos) return false;
  out = std::stoll(t);
  return true;
}

inline std::string widths_str(const std::vector<int>& bits) {
  std::vector<int64_t> wide(bits.begin(), bits.end());
  return shape_str(wide);
}

// SaqFormat.parse without the checks that need the row width (check_width): "" or what is wrong.
inline std::string parse_format(const std::string& spec, SaqFormat& f) {
  f.spec = spec;
  if (trim(spec).empty())
    return "saq is empty: it must hold the format's spec, SaqFormat.text() (e.g. "
           "'8:1,4:11,2;stage=64;v_group=64;sink=0;clip=2;sink_tokens=3')";
  std::vector<std::string> parts = split(spec, ';');
  for (std::string& part : parts) part = trim(part);
  for (size_t i = 1; i < parts.size(); ++i) {
    const size_t eq = parts[i].find('=');
    const std::string key = parts[i].substr(0, eq);
    const std::string value = trim(eq == std::string::npos ? std::string() : parts[i].substr(eq + 1));
    int64_t number = 0;
    int64_t* field = key == "stage" ? &f.stage : key == "v_group" ? &f.v_group : key == "sink" ? &f.sink
                     : key == "clip" ? &f.clip : key == "sink_tokens" ? &f.sink_tokens : nullptr;
    if (field == nullptr || !parse_count(value, number))
      return message("SAQ option '", parts[i], "': use stage=N, v_group=N, sink=N, clip=BITS or sink_tokens=N");
    *field = number;
  }
  const std::vector<std::string> stairs = split(parts[0], ',');
  for (size_t i = 0; i < stairs.size(); ++i) {
    const std::string part = trim(stairs[i]);
    const size_t colon = part.find(':');
    int64_t bits = 0, count = 0;
    if (!parse_count(part.substr(0, colon), bits) ||
        (colon != std::string::npos && !parse_count(part.substr(colon + 1), count)))
      return message("SAQ stair '", part, "': write BITS:STAGES (e.g. 8:1), the last one BITS");
    if ((i + 1 < stairs.size()) != (count > 0))
      return message("SAQ stairs '", parts[0], "': every stair but the last needs BITS:STAGES (stages >= 1), the "
                     "last one is BITS alone (it holds all older stages)");
    f.bits.push_back(static_cast<int>(bits));
    f.stages.push_back(count);
  }
  for (int b : f.bits)
    if (b != 8 && b != 4 && b != 2)
      return message("SAQ stair widths ", widths_str(f.bits), ": each must be 8, 4 or 2 bits");
  if (!std::is_sorted(f.bits.rbegin(), f.bits.rend()))
    return message("SAQ stair widths ", widths_str(f.bits), " must not increase with age");
  if (f.stage < 8 || f.stage % 8) return message("SAQ stage of ", f.stage, " tokens: use a multiple of 8");
  if (f.v_group < 1) return message("SAQ v_group ", f.v_group, " must divide the KV width");
  if (f.clip != 0 && f.clip != 2 && f.clip != 4 && f.clip != 8)
    return message("SAQ clip=", f.clip, ": 0 (none) or the widest stair to clip (2, 4 or 8)");
  if (f.sink_tokens < 0 || f.sink_tokens >= f.stage)
    return message("SAQ sink_tokens=", f.sink_tokens, ": use 0 up to stage - 1 (", f.stage - 1, ")");
  return {};
}

inline std::string check_width(const SaqFormat& f, int64_t W) {
  if (W % f.v_group)
    return message("SAQ v_group ", f.v_group, " must divide the KV width ", W, " (num_kv_heads * head_dim)");
  if (W % 4) return message("SAQ needs a KV width divisible by 4, not ", W);
  return {};
}

// ------------------------------------------------------------------------------------------------ quantization

// Code of channel c in a packed row (channel order, the first in the low bits).
inline int code_at(const uint8_t* row, int64_t c, int bits) {
  const int64_t bit = c * bits;
  return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// kernels/kv_saq.py, quantize_asym / encode_record / decode_record, bit for bit: fp32 arithmetic with every
// product rounded before it is added (torch runs them as separate ops), fp16 rounding of lo and scale. GCC
// contracts a * b + c into one FMA by default (-ffp-contract=fast), so this section turns that off; clang only
// contracts inside one expression, and the products below have their own statements.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// One group x[0 : n] at `bits`: codes[0 : n], lo and scale. Without clip the range is min..max; with clip each
// r of kClipRatios gives lo = fp16(r * min), scale = fp16((r * max - lo) / levels) (0 -> 1), and the r whose
// dequantized values have the least fp32 sum of squared errors wins (ties: the larger r, tried first).
inline void quantize_group(const float* x, int64_t n, int bits, bool clip, uint8_t* codes, half* lo_out,
                           half* scale_out, uint8_t* trial) {
  const float levels = static_cast<float>((1 << bits) - 1);
  float low = x[0], high = x[0];
  for (int64_t i = 1; i < n; ++i) low = std::min(low, x[i]), high = std::max(high, x[i]);
  float best = 0.0f;
  for (size_t t = 0; t < (clip ? std::size(kClipRatios) : 1); ++t) {
    const float r = static_cast<float>(kClipRatios[t]);
    const float low_r = low * r, high_r = high * r;
    const half lo = from_f32<half>(low_r);
    const float lo_f = to_f32(lo);
    const float range = high_r - lo_f;
    half scale = from_f32<half>(range / levels);
    if (to_f32(scale) == 0.0f) scale = from_f32<half>(1.0f);
    const float scale_f = to_f32(scale);
    float err = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float c = std::clamp(std::nearbyint((x[i] - lo_f) / scale_f), 0.0f, levels);  // ties to even
      trial[i] = static_cast<uint8_t>(c);
      const float step = c * scale_f;
      const float diff = (lo_f + step) - x[i];
      const float square = diff * diff;
      err += square;
    }
    if (t > 0 && !(err < best)) continue;
    best = err;
    std::memcpy(codes, trial, n);
    *lo_out = lo;
    *scale_out = scale;
  }
}

// kVec groups side by side, quantized as quantize_group quantizes each one: group j holds x[i * ld + j] (i < n),
// its codes go to codes[i * ld + j], its lo and scale to lo[j * stride], scale[j * stride]. The same operations
// lane by lane (clamping before rounding commutes with rounding to the integers 0..levels; the rounding adds
// and subtracts 1.5 * 2^23: to nearest, ties to even), and each lane sums its squared errors in the same order.
inline void quantize_lanes(const float* x, int64_t ld, int64_t n, int bits, bool clip, uint8_t* codes, half* lo,
                           half* scale, int64_t stride) {
  const float levels = static_cast<float>((1 << bits) - 1), round = 12582912.0f;
  vfloat low = vload(x), high = low;
  for (int64_t i = 1; i < n; ++i) {
    const vfloat v = vload(x + i * ld);
    low = v < low ? v : low;
    high = v > high ? v : high;
  }
  vfloat best = {}, best_lo = {}, best_scale = {};
  for (size_t t = 0; t < (clip ? std::size(kClipRatios) : 1); ++t) {
    const float r = static_cast<float>(kClipRatios[t]);
    vfloat lo_f, scale_f;
    for (int j = 0; j < kVec; ++j) {
      const float low_r = low[j] * r, high_r = high[j] * r;
      lo_f[j] = to_f32(from_f32<half>(low_r));
      const float range = high_r - lo_f[j];
      const float s = to_f32(from_f32<half>(range / levels));
      scale_f[j] = s == 0.0f ? 1.0f : s;
    }
    vfloat err = {};
    for (int64_t i = 0; i < n; ++i) {
      const vfloat v = vload(x + i * ld);
      vfloat q = (v - lo_f) / scale_f;
      q = q < 0.0f ? vfloat{} : q;
      q = q > levels ? vfloat{} + levels : q;
      const vfloat c = (q + round) - round;
      const vfloat step = c * scale_f;
      const vfloat diff = (lo_f + step) - v;
      const vfloat square = diff * diff;
      err += square;
    }
    if (t == 0) {
      best = err, best_lo = lo_f, best_scale = scale_f;
      continue;
    }
    const auto better = err < best;  // ties keep the larger ratio
    best = better ? err : best;
    best_lo = better ? lo_f : best_lo;
    best_scale = better ? scale_f : best_scale;
  }
  for (int64_t i = 0; i < n; ++i) {
    vfloat q = (vload(x + i * ld) - best_lo) / best_scale;
    q = q < 0.0f ? vfloat{} : q;
    q = q > levels ? vfloat{} + levels : q;
    const vfloat c = (q + round) - round;
    for (int j = 0; j < kVec; ++j) codes[i * ld + j] = static_cast<uint8_t>(c[j]);
  }
  for (int j = 0; j < kVec; ++j) {
    lo[j * stride] = from_f32<half>(best_lo[j]);  // exact: fp16 values
    scale[j * stride] = from_f32<half>(best_scale[j]);
  }
}

inline const half* half_field(const uint8_t* record, int64_t offset) {
  return reinterpret_cast<const half*>(record + offset);
}
inline half* half_field(uint8_t* record, int64_t offset) { return reinterpret_cast<half*>(record + offset); }

// A record at `bits` -> K and V, fp32 [stage, W]: lo + code * scale.
inline void decode_record(const SaqFormat& f, const uint8_t* record, int bits, float* k, float* v) {
  const int64_t S = f.stage, W = f.width, row = f.code_row(bits);
  const half* k_lo = half_field(record, f.k_lo());
  const half* k_scale = half_field(record, f.k_scale());
  const half* v_lo = half_field(record, f.v_lo());
  const half* v_scale = half_field(record, f.v_scale());
  for (int64_t t = 0; t < S; ++t) {
    const uint8_t* kc = record + f.k_codes() + t * row;
    const uint8_t* vc = record + f.v_codes(bits) + t * row;
    for (int64_t c = 0; c < W; ++c) {
      const float k_step = static_cast<float>(code_at(kc, c, bits)) * to_f32(k_scale[c]);
      k[t * W + c] = to_f32(k_lo[c]) + k_step;
      const int64_t g = t * f.groups + c / f.v_group;
      const float v_step = static_cast<float>(code_at(vc, c, bits)) * to_f32(v_scale[g]);
      v[t * W + c] = to_f32(v_lo[g]) + v_step;
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// codes [rows, W] (one byte each) -> packed rows of W * bits / 8 bytes.
inline void pack_codes(const uint8_t* codes, int64_t rows, int64_t W, int bits, uint8_t* out) {
  const int64_t row = W * bits / 8;
  std::memset(out, 0, rows * row);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t c = 0; c < W; ++c) {
      const int64_t bit = c * bits;
      out[t * row + (bit >> 3)] |= static_cast<uint8_t>(codes[t * W + c] << (bit & 7));
    }
}

// Per-thread buffers of the write, grown on demand and reused across calls.
struct WriteScratch {
  std::vector<float> k, v, old_k, old_v, column, block;
  std::vector<uint8_t> k_codes, v_codes, column_codes, block_codes, trial;
};

inline WriteScratch& write_scratch() {
  thread_local WriteScratch scratch;
  return scratch;
}

// K and V fp32 [stage, W] -> a record at `bits`: K per channel over the stage's tokens, V per token per group.
inline void encode_record(const SaqFormat& f, const float* k, const float* v, int bits, uint8_t* record,
                          WriteScratch& sc) {
  const int64_t S = f.stage, W = f.width, G = f.v_group;
  const bool clip = f.clipped(bits);
  uint8_t* k_codes = grow(sc.k_codes, S * W);
  uint8_t* v_codes = grow(sc.v_codes, S * W);
  float* column = grow(sc.column, S);
  uint8_t* column_codes = grow(sc.column_codes, S);
  uint8_t* trial = grow(sc.trial, std::max(S, G));
  half* k_lo = half_field(record, f.k_lo());
  half* k_scale = half_field(record, f.k_scale());
  half* v_lo = half_field(record, f.v_lo());
  half* v_scale = half_field(record, f.v_scale());
  int64_t c = 0;  // K: kVec channels at a time, then one by one
  for (; c + kVec <= W; c += kVec) quantize_lanes(k + c, W, S, bits, clip, k_codes + c, k_lo + c, k_scale + c, 1);
  for (; c < W; ++c) {
    for (int64_t t = 0; t < S; ++t) column[t] = k[t * W + c];
    quantize_group(column, S, bits, clip, column_codes, k_lo + c, k_scale + c, trial);
    for (int64_t t = 0; t < S; ++t) k_codes[t * W + c] = column_codes[t];
  }
  float* block = grow(sc.block, G * kVec);  // V: one group of kVec tokens, transposed (a token per lane)
  uint8_t* block_codes = grow(sc.block_codes, G * kVec);
  int64_t t0 = 0;
  for (; t0 + kVec <= S; t0 += kVec)
    for (int64_t g = 0; g < f.groups; ++g) {
      const int64_t at = t0 * W + g * G, scales = t0 * f.groups + g;
      for (int64_t j = 0; j < kVec; ++j)
        for (int64_t i = 0; i < G; ++i) block[i * kVec + j] = v[at + j * W + i];
      quantize_lanes(block, kVec, G, bits, clip, block_codes, v_lo + scales, v_scale + scales, f.groups);
      for (int64_t j = 0; j < kVec; ++j)
        for (int64_t i = 0; i < G; ++i) v_codes[at + j * W + i] = block_codes[i * kVec + j];
    }
  for (; t0 < S; ++t0)
    for (int64_t g = 0; g < f.groups; ++g)
      quantize_group(v + t0 * W + g * G, G, bits, clip, v_codes + t0 * W + g * G, v_lo + t0 * f.groups + g,
                     v_scale + t0 * f.groups + g, trial);
  pack_codes(k_codes, S, W, bits, record + f.k_codes());
  pack_codes(v_codes, S, W, bits, record + f.v_codes(bits));
}

}  // namespace fastattention
