// Native CPU kernel of the ONNX custom op fastattention::FlashAttention (domain "fastattention", version 1).
//
// Contract: kernels/reference.py, paged_attention_ref. This kernel must match it; the comparison is
// tests/kernels/test_attention_cpu.py, run on random inputs.
//   inputs   q [B, S, Hq*D], k [B, S, Hkv*D], v [B, S, Hkv*D]                    T
//            k_cache, v_cache [num_blocks NB, block_size BS, Hkv*D]             C (the paged pool of all rows)
//            block_table [B, MB] int32, slot_mapping [B, S] int64, past_lens [B] int32, total_lens [B] int32
//   outputs  o [B, S, Hq*D] T, k_cache_out and v_cache_out (the updated pools, C, with the input pools' shapes)
//   attrs    num_heads, num_kv_heads, scale, causal, sliding_window (0 = none), kv_format ("fp32" | "fp16")
//   (T, C) is (float32, float32), (float16, float16) or (float32, float16). All math is fp32; fp16 is storage
//   only. kv_format must name C. New K/V rows are rounded to C (round to nearest even) when written.
// Masking is bottom-right aligned. Query s of row b sits at position past_lens[b] + s. It sees key j when
//   j < total_lens[b]; and, if causal, j <= past_lens[b] + s; and, with a window W > 0, past_lens[b] + s - j < W.
// A query that sees no key outputs zeros. Padding queries (past_lens[b] + s >= total_lens[b]) output zeros
// too: the contract lets them hold any finite value, and skipping them saves the work.
// In place: the runtime binds each pool as both input and output (IO binding). If ORT hands us the input
// buffer as the output, we write into it. Otherwise we first copy the input pool to the output.
//
// The file reads top to bottom:
//   quantized pool formats -> the attention job (cache update, plan, decode kernel, tiled prefill kernel,
//   split-KV combine) -> validation -> ORT glue (kernel, op, RegisterCustomOps). The numerics (fp16, exp) and
//   the micro-kernels are in fastattention_cpu.h, shared with the SAQ op (saq_cpu.cc, added to the same domain).
//
// Speed. The inner loops are written on GCC/Clang vector types (see the header's micro-kernels). They are portable
// C++ for g++ and clang on x86-64 and aarch64; the only intrinsics widen fp16 rows (g++ 12 does not vectorize
// _Float16 conversions). Work items run on ORT's intra-op thread pool through KernelContext_ParallelFor, or
// serially when the call is too small to pay for waking the pool. Scratch memory is per thread and reused
// across calls: once warm, a call allocates nothing but the few shape vectors of the ORT glue.
//   - Decode (S == 1) streams the KV cache from DRAM: in a real model every layer's pool is read once per
//     token and is long gone from the caches by the next token. So a work item is (row, contiguous key
//     range) and reads each token's whole K and V rows (all KV heads) once, front to back, updating the
//     online softmax of all Hq query heads. Rows ahead of use are prefetched a few at a time between
//     micro-kernel calls (the paged blocks jump around memory, which the hardware prefetchers do not follow).
//     Rows are split into key ranges only to give each hardware thread about kItemsPerThread items; the
//     partial softmaxes of a split row are merged once at the end (flash-decoding). fp16 pools are read as
//     they are: the micro-kernels widen each vector as they load it.
//   - Prefill: FlashAttention-2 tiles, one work item per (query tile, row, KV head, key split). A tile holds up
//     to 64 query rows (positions x group heads) and loops over 64-key tiles with an online softmax. It
//     visits only the keys that some row of the tile can see (tiles above the causal diagonal or before the
//     window are skipped), and it masks only the tiles on the diagonal or the window's edge. A tile with a
//     single query position uses the decode kernel instead.
//   Tile sizes were picked on a 2-vCPU AMD EPYC VM (Zen 4, AVX-512), 2026-11. To re-tune, change kRowsPerTile,
//   kKeyTile, kDecodeChunk, kPrefetchKeys, kItemsPerThread and the micro-kernel shapes, then rerun
//   `python -m benchmarks.attention_cpu` (its cold-cache table is the one that matters for decode).

#include "fastattention_cpu.h"

namespace fastattention {
namespace {

// ------------------------------------------------------------------------------------------------ quantized pools

// Pool formats, named by the pool's element type C: float (fp32), half (fp16), int8_t (int8 codes) and uint8_t
// (int4 codes, two per byte). The quantized ones are specified in kernels/kv_quant.py: one fp16 scale per token
// per group of channels (a head for int8, 32 channels for int4), value = code * scale.
template <typename C>
constexpr bool kQuantized = std::is_same_v<C, int8_t> || std::is_same_v<C, uint8_t>;
template <typename C>
constexpr int kQmax = std::is_same_v<C, int8_t> ? 127 : 7;
constexpr int64_t kInt4Group = 32;  // kernels/kv_formats.py, INT4_GROUP

template <typename C>
constexpr const char* kv_format_name() {
  if constexpr (std::is_same_v<C, float>) return "fp32";
  else if constexpr (std::is_same_v<C, half>) return "fp16";
  else if constexpr (std::is_same_v<C, int8_t>) return "int8";
  else return "int4";
}
// Pool elements per token row of W channels, and the column of channel c.
template <typename C>
constexpr int64_t code_width(int64_t W) { return std::is_same_v<C, uint8_t> ? W / 2 : W; }
template <typename C>
constexpr int64_t code_column(int64_t c) { return std::is_same_v<C, uint8_t> ? c / 2 : c; }
// Channels per scale.
template <typename C>
constexpr int64_t group_size(int64_t head_dim) { return std::is_same_v<C, uint8_t> ? kInt4Group : head_dim; }

// Quantizes one token row x[0 : W] (kernels/kv_quant.py, quantize_kv_ref): per group of `group` channels,
// scale = fp16(max|x| / qmax), 1 where that is 0; code = round-half-even(x * fp32(1 / scale)) clamped to
// [-qmax, qmax]. int4 codes go two per byte, the even channel in the low nibble.
template <typename C>
void quantize_row(const float* x, int64_t W, int64_t group, C* codes, half* scales) {
  constexpr float qmax = kQmax<C>;
  for (int64_t g0 = 0; g0 < W; g0 += group) {
    float amax = 0.0f;
    for (int64_t c = g0; c < g0 + group; ++c) amax = std::max(amax, std::fabs(x[c]));
    half scale = from_f32<half>(amax / qmax);
    if (to_f32(scale) == 0.0f) scale = from_f32<half>(1.0f);
    scales[g0 / group] = scale;
    const float inverse = 1.0f / to_f32(scale);
    for (int64_t c = g0; c < g0 + group; ++c) {
      float r = std::nearbyint(x[c] * inverse);  // the default rounding mode: to nearest, ties to even
      r = r > qmax ? qmax : (r < -qmax ? -qmax : (r == r ? r : 0.0f));
      const int code = static_cast<int>(r);
      if constexpr (std::is_same_v<C, int8_t>) {
        codes[c] = static_cast<int8_t>(code);
      } else if (c % 2 == 0) {
        codes[c / 2] = static_cast<uint8_t>(code & 0x0F);
      } else {
        codes[c / 2] = static_cast<uint8_t>(codes[c / 2] | ((code & 0x0F) << 4));
      }
    }
  }
}

// kVec bytes of int4 codes: their low nibbles (even channels) and high nibbles (odd channels), sign-extended.
inline void vload_nibbles(const uint8_t* p, vfloat& lo, vfloat& hi) {
  const vint x = widen_bytes(reinterpret_cast<const int8_t*>(p));  // sign-extended: the high nibble is x >> 4
  lo = to_vfloat((x << 28) >> 28);
  hi = to_vfloat(x >> 4);
}
// Stores lo[0], hi[0], lo[1], hi[1], ... (2 * kVec values, channel order) times `scale`.
template <size_t... I>
inline void store_interleaved(float* p, vfloat lo, vfloat hi, float scale, std::index_sequence<I...>) {
  typedef float pair __attribute__((vector_size(2 * sizeof(vfloat))));
  const pair v = __builtin_shufflevector(lo, hi, (I / 2 + (I % 2) * kVec)...);
  const pair scaled = v * scale;
  std::memcpy(p, &scaled, sizeof scaled);
}

// dst[0 : n] = codes[0 : n] * scale (int8).
inline void dequantize(const int8_t* codes, float scale, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) vstore(dst + i, vload(codes + i) * scale);
  for (; i < n; ++i) dst[i] = codes[i] * scale;
}
// dst[0 : n] = channels [c0, c0 + n) of an int4 row (codes and one scale per 32 channels), dequantized.
inline void dequantize(const uint8_t* codes, const half* scales, int64_t c0, float* dst, int64_t n) {
  int64_t i = 0;
  static_assert(kInt4Group % (2 * kVec) == 0, "a vector of bytes stays inside one group");
  if (c0 % (2 * kVec) == 0)  // then no vector of bytes straddles two groups
    for (; i + 2 * kVec <= n; i += 2 * kVec) {
      vfloat lo, hi;
      vload_nibbles(codes + (c0 + i) / 2, lo, hi);
      store_interleaved(dst + i, lo, hi, to_f32(scales[(c0 + i) / kInt4Group]),
                        std::make_index_sequence<2 * kVec>{});
    }
  for (; i < n; ++i) {
    const int64_t c = c0 + i;
    const int nibble = (codes[c / 2] >> (4 * (c % 2))) & 0x0F;
    dst[i] = static_cast<float>((nibble ^ 8) - 8) * to_f32(scales[c / kInt4Group]);
  }
}


// ------------------------------------------------------------------------------------------------ the job

constexpr int64_t kRowsPerTile = 64;    // prefill: query rows (positions x group heads) per tile
constexpr int64_t kKeyTile = 64;        // prefill: keys per tile
constexpr int kKeyRows = 6;             // prefill: keys per QK^T micro-kernel call (6 x 2 vectors)
constexpr int kQueryRows = 6;           // prefill: query rows per PV micro-kernel call (6 x 2 vectors)
constexpr int64_t kMinItems = 16;       // prefill: split the keys of short batches until there are this many items
constexpr int64_t kDecodeChunk = 64;    // decode: keys per step of the online softmax (a multiple of kVec)
constexpr int64_t kPrefetchKeys = 64;   // decode: how many keys ahead of use the K and V rows are prefetched
constexpr int64_t kItemsPerThread = 2;  // decode: split rows until each hardware thread has this many items
constexpr int64_t kMinSplitKeys = 256;  // prefill and decode: but keep at least this many keys per split
static_assert(kDecodeChunk % kVec == 0, "decode chunks are whole micro-kernel calls");

// Per-thread buffers of a work item, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> qt, st, o, m, l, alpha, shift, rowsum, kbuf, vbuf, zero, pscaled;
  std::vector<int64_t> lo, hi;
  std::vector<const float*> krows, vrows;
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Decode: keys [ka, kb) of row b. slot >= 0: the row is split, and this piece's partial softmax goes to
// partial slot `slot`; -1: the piece is the whole row and writes the output itself.
struct DecodeItem {
  int64_t b, ka, kb, slot;
};
// A split row: its pieces hold the partial slots [first_slot, first_slot + count).
struct SplitRow {
  int64_t b, first_slot, count;
};

// Buffers of one call, owned by the thread that runs Compute and shared (read-only, or one slice per item)
// with the pool threads that run its items. Reused across calls.
struct CallScratch {
  std::vector<DecodeItem> items;
  std::vector<SplitRow> splits;
  std::vector<float> partial, acc;
};

CallScratch& call_scratch() {
  thread_local CallScratch scratch;
  return scratch;
}

// W: channels per token (Hkv * D). CW: pool elements per token row (W, or W / 2 for int4). group: channels per
// scale and NS: scales per token (quantized pools only).
struct Sizes {
  int64_t B, S, Hq, Hkv, G, D, W, CW, NB, BS, MB, group = 1, NS = 0;
};

// One call of the op. T: q/k/v/o dtype. C: pool element type (see "numerics").
template <typename T, typename C>
struct Job {
  // What the micro-kernels read: the pool's own rows (fp32, fp16), or rows dequantized to fp32 (int8, int4).
  using R = std::conditional_t<kQuantized<C>, float, C>;
  Sizes n;
  float scale;
  bool causal;
  int64_t window;
  const T* q;
  const T* k;
  const T* v;
  const int32_t* block_table;
  const int64_t* slot_mapping;
  const int32_t* past;
  const int32_t* total;
  C* k_pool;  // the output pools: updated first, then read by the attention
  C* v_pool;
  half* k_scales = nullptr;  // quantized pools: their scale pools [NB, BS, NS] (output), and K's channel means [W]
  half* v_scales = nullptr;
  const float* k_mean = nullptr;
  T* o;
  CallScratch* call;  // decode items and partial softmaxes
  // work decomposition
  bool decode = false;  // S == 1: items are DecodeItems; else (query tile, row, KV head, key split)
  int pv_heads = 1;     // query heads per decode P V micro-kernel call
  int64_t q_tile = 1, num_q_tiles = 1, num_splits = 1, partial_rows = 0;
  int64_t flops = 0;  // upper bound of the FLOPs of QK^T and PV: decides whether to go parallel

  int64_t real_len(int64_t b) const { return std::clamp<int64_t>(int64_t{total[b]} - past[b], 0, n.S); }
  int64_t key_lo(int64_t b, int64_t s) const {
    return window > 0 ? std::max<int64_t>(0, past[b] + s - window + 1) : 0;
  }
  int64_t key_hi(int64_t b, int64_t s) const {
    return causal ? std::min<int64_t>(total[b], past[b] + s + 1) : int64_t{total[b]};
  }
  int64_t num_items() const {
    return decode ? static_cast<int64_t>(call->items.size()) : num_q_tiles * n.B * n.Hkv * num_splits;
  }
  int64_t partial_stride() const { return decode ? n.Hq * (n.D + 2) : partial_rows * (n.D + 2); }

  // ---- step 1: write the new K/V rows into their slots (slots were validated). Quantized: K minus its
  // channel means, and V, quantized per token (quantize_row).
  void write_new_kv() const {
    const int64_t tokens = n.B * n.S, W = n.W;
    for (int64_t t = 0; t < tokens; ++t) {
      C* kd = k_pool + slot_mapping[t] * n.CW;
      C* vd = v_pool + slot_mapping[t] * n.CW;
      if constexpr (kQuantized<C>) {
        float* x = grow(thread_scratch().kbuf, W);
        for (int64_t i = 0; i < W; ++i) x[i] = to_f32(k[t * W + i]) - k_mean[i];
        quantize_row(x, W, n.group, kd, k_scales + slot_mapping[t] * n.NS);
        for (int64_t i = 0; i < W; ++i) x[i] = to_f32(v[t * W + i]);
        quantize_row(x, W, n.group, vd, v_scales + slot_mapping[t] * n.NS);
      } else if constexpr (std::is_same_v<T, C>) {
        std::memcpy(kd, k + t * W, W * sizeof(C));
        std::memcpy(vd, v + t * W, W * sizeof(C));
      } else {
        for (int64_t i = 0; i < W; ++i) kd[i] = from_f32<C>(to_f32(k[t * W + i]));
        for (int64_t i = 0; i < W; ++i) vd[i] = from_f32<C>(to_f32(v[t * W + i]));
      }
    }
  }

  // ---- step 2: split the work into items.
  void plan() {
    for (int64_t b = 0; b < n.B; ++b) flops += 4 * real_len(b) * total[b] * n.Hq * n.D;
    // Padding queries output zeros; the items below skip them.
    for (int64_t b = 0; b < n.B; ++b)
      std::memset(o + (b * n.S + real_len(b)) * n.Hq * n.D, 0, (n.S - real_len(b)) * n.Hq * n.D * sizeof(T));
    pv_heads = heads_per_call(n.G);
    decode = n.S == 1;
    if (decode) return plan_decode();
    q_tile = std::max<int64_t>(1, kRowsPerTile / n.G);
    num_q_tiles = (n.S + q_tile - 1) / q_tile;
    const int64_t base = num_q_tiles * n.B * n.Hkv;
    int64_t longest = 0;
    for (int64_t b = 0; b < n.B; ++b) longest = std::max<int64_t>(longest, total[b]);
    num_splits = 1;
    if (base < kMinItems)
      num_splits = std::max<int64_t>(1, std::min((kMinItems + base - 1) / base, longest / kMinSplitKeys));
    if (num_splits > 1) {
      partial_rows = round_up(q_tile * n.G, kPanel);
      grow(call->partial, num_items() * partial_stride());  // every item initializes its own slice
    }
  }

  // Decode: one item per row, each row's keys split into equal pieces only as far as it takes to give every
  // hardware thread kItemsPerThread items of about the same size (pieces of about piece_keys >= kMinSplitKeys
  // keys: a row of 2.0 pieces' keys makes 2 pieces, not 3 of which one thread would run two). Longest first.
  void plan_decode() {
    int64_t keys = 0;
    for (int64_t b = 0; b < n.B; ++b)
      if (real_len(b) > 0) keys += std::max<int64_t>(0, key_hi(b, 0) - key_lo(b, 0));
    const int64_t wanted = flops >= kMinParallelFlops ? kItemsPerThread * hardware_threads() : 1;
    const int64_t piece_keys = std::max(kMinSplitKeys, keys / wanted);
    std::vector<DecodeItem>& items = call->items;
    items.clear();
    call->splits.clear();
    int64_t slots = 0;
    for (int64_t b = 0; b < n.B; ++b) {
      if (real_len(b) == 0) continue;
      const int64_t ka = key_lo(b, 0), kb = std::max(ka, key_hi(b, 0));
      const int64_t pieces = std::max<int64_t>(1, (2 * (kb - ka) + piece_keys) / (2 * piece_keys));  // rounded
      if (pieces == 1) {
        items.push_back({b, ka, kb, -1});
        continue;
      }
      call->splits.push_back({b, slots, pieces});
      for (int64_t i = 0; i < pieces; ++i)
        items.push_back({b, ka + (kb - ka) * i / pieces, ka + (kb - ka) * (i + 1) / pieces, slots++});
    }
    std::sort(items.begin(), items.end(),
              [](const DecodeItem& x, const DecodeItem& y) { return x.kb - x.ka > y.kb - y.ka; });
    grow(call->partial, slots * partial_stride());
  }

  // ---- step 3: one work item.
  void run_item(int64_t item) const {
    if (decode) return run_decode_item(call->items[item]);
    run_tile_item(item);
  }

  void run_decode_item(const DecodeItem& item) const {
    Scratch& sc = thread_scratch();
    const int64_t Hq = n.Hq, D = n.D;
    float *O, *m, *l;
    if (item.slot >= 0) {
      O = call->partial.data() + item.slot * partial_stride();
      m = O + Hq * D;
      l = m + Hq;
    } else {
      O = grow(sc.o, Hq * D);
      m = grow(sc.m, Hq);
      l = grow(sc.l, Hq);
    }
    std::fill(O, O + Hq * D, 0.0f);
    std::fill(m, m + Hq, kNegInf);
    std::fill(l, l + Hq, 0.0f);
    if (item.ka < item.kb) attend_query(item.b, 0, 0, n.Hkv, item.ka, item.kb, sc, O, m, l);
    if (item.slot >= 0) return;
    for (int64_t h = 0; h < Hq; ++h) store_row(o + (item.b * Hq + h) * D, O + h * D, l[h] > 0.0f ? 1.0f / l[h] : 0.0f);
  }

  // Prefill items run heaviest first: late query tiles see the most keys.
  void run_tile_item(int64_t item) const {
    int64_t idx = item;
    const int64_t split = idx % num_splits;
    idx /= num_splits;
    const int64_t h = idx % n.Hkv;
    idx /= n.Hkv;
    const int64_t b = idx % n.B;
    const int64_t qt = num_q_tiles - 1 - idx / n.B;
    const int64_t s0 = qt * q_tile;
    const int64_t npos = std::max<int64_t>(0, std::min(s0 + q_tile, real_len(b)) - s0);
    const int64_t M = npos * n.G, Mp = round_up(M, kPanel);

    Scratch& sc = thread_scratch();
    float *O, *m, *l;
    if (num_splits > 1) {
      O = call->partial.data() + item * partial_stride();
      m = O + partial_rows * n.D;
      l = m + partial_rows;
    } else {
      O = grow(sc.o, Mp * n.D);
      m = grow(sc.m, Mp);
      l = grow(sc.l, Mp);
    }
    std::fill(O, O + Mp * n.D, 0.0f);
    std::fill(m, m + Mp, kNegInf);
    std::fill(l, l + Mp, 0.0f);
    if (npos == 0) return;

    const int64_t first = key_lo(b, s0), last = key_hi(b, s0 + npos - 1);
    const int64_t span = std::max<int64_t>(0, last - first);
    const int64_t ka = first + span * split / num_splits, kb = first + span * (split + 1) / num_splits;
    if (ka < kb) {
      if (npos == 1)
        attend_query(b, s0, h, h + 1, ka, kb, sc, O, m, l);
      else
        attend_tiled(b, h, s0, npos, ka, kb, sc, O, m, l);
    }
    if (num_splits == 1) write_output(b, h, s0, npos, O, l);
  }

  // Pool slots of keys [n0, n0 + nk) of row b.
  void key_slots(int64_t b, int64_t n0, int64_t nk, int64_t* out) const {
    const int32_t* table = block_table + b * n.MB;
    int64_t block = n0 / n.BS, offset = n0 % n.BS;
    for (int64_t i = 0; i < nk; ++i) {
      out[i] = int64_t{table[block]} * n.BS + offset;
      if (++offset == n.BS) offset = 0, ++block;
    }
  }

  // Asks the memory system for columns [c0, c1) of the K and V rows of a chunk of keys ahead of use: the
  // paged blocks jump around memory, which the hardware prefetchers follow poorly. The rows are spread over
  // the micro-kernel calls of the current chunk (`step`, a row or two each): a burst of hundreds of lines
  // stalls the core until the memory system has taken them all, so the math would not overlap the loads.
  // (Measured on the 2-vCPU EPYC: 1.2x faster cold decode than one burst per chunk.)
  // Quantized pools: the rows' scales too (a few bytes per token, on the line of their block's neighbours).
  struct Prefetcher {
    const char* k_base;  // the pools' bytes, from column c0
    const char* v_base;
    const char* k_scale_base = nullptr;  // quantized: the scale pools' bytes
    const char* v_scale_base = nullptr;
    int64_t row_stride = 0, row_bytes = 0, scale_stride = 0;  // bytes
    int64_t steps = 1;  // the calls of `step` that share the requests of a chunk
    int64_t count = 0, next = 0, step_count = 0;
    int64_t slots[kDecodeChunk];  // the chunk's token slots; slots[next] is asked for next

    void start(const Job& job, int64_t b, int64_t n0, int64_t nk) {
      count = nk;
      next = step_count = 0;
      job.key_slots(b, n0, nk, slots);
    }
    // One step of work done: ask for the rows due by now.
    void step() { issue(ceil_div(++step_count * count, steps)); }
    void issue(int64_t until) {
      for (const int64_t end = std::min(count, until); next < end; ++next) {
        const char* kr = k_base + slots[next] * row_stride;
        const char* vr = v_base + slots[next] * row_stride;
        for (int64_t byte = 0; byte < row_bytes; byte += 64) {
          __builtin_prefetch(kr + byte);
          __builtin_prefetch(vr + byte);
        }
        __builtin_prefetch(kr + row_bytes - 1);  // the row's last line when it does not start on a line
        __builtin_prefetch(vr + row_bytes - 1);
        if constexpr (kQuantized<C>) {
          __builtin_prefetch(k_scale_base + slots[next] * scale_stride);
          __builtin_prefetch(v_scale_base + slots[next] * scale_stride);
        }
      }
    }
  };

  // A prefetcher of channels [c0, c1).
  Prefetcher prefetcher(int64_t c0, int64_t c1) const {
    Prefetcher pf;
    const int64_t col0 = code_column<C>(c0), col1 = code_column<C>(c1 + 1);  // int4: the bytes around them
    pf.k_base = reinterpret_cast<const char*>(k_pool + col0);
    pf.v_base = reinterpret_cast<const char*>(v_pool + col0);
    pf.row_stride = n.CW * int64_t{sizeof(C)};
    pf.row_bytes = (std::min(col1, n.CW) - col0) * int64_t{sizeof(C)};
    if constexpr (kQuantized<C>) {
      pf.k_scale_base = reinterpret_cast<const char*>(k_scales + c0 / n.group);
      pf.v_scale_base = reinterpret_cast<const char*>(v_scales + c0 / n.group);
      pf.scale_stride = n.NS * int64_t{sizeof(half)};
    }
    return pf;
  }

  // Head h (channels [h * D, h * D + D)) of the token row in `slot` of a pool, as fp32: the pool row itself
  // (fp32), or widened or dequantized into buf[0 : D].
  const float* head_row_f32(const C* pool, const half* scales, int64_t slot, int64_t h, float* buf) const {
    const int64_t c0 = h * n.D;
    if constexpr (std::is_same_v<C, float>) {
      return pool + slot * n.CW + c0;
    } else if constexpr (std::is_same_v<C, half>) {
      widen(pool + slot * n.CW + c0, buf, n.D);
    } else if constexpr (std::is_same_v<C, int8_t>) {  // one scale per head
      dequantize(pool + slot * n.CW + c0, to_f32(scales[slot * n.NS + h]), buf, n.D);
    } else {
      dequantize(pool + slot * n.CW, scales + slot * n.NS, c0, buf, n.D);
    }
    return buf;
  }

  // Pointers to head h of the token rows of nk slots, as the micro-kernels read them: the pool rows (fp32,
  // fp16), or their dequantized copies in buf [nk, D] (int8, int4). Entries nk..kDecodeChunk repeat the last
  // row: the micro-kernels compute whole groups of kVec keys, and the scores of these are never used.
  void head_rows(const C* pool, const half* scales, const int64_t* slots, int64_t nk, int64_t h, float* buf,
                 const R** out) const {
    for (int64_t i = 0; i < nk; ++i) {
      if constexpr (kQuantized<C>) out[i] = head_row_f32(pool, scales, slots[i], h, buf + i * n.D);
      else out[i] = pool + slots[i] * n.CW + h * n.D;
    }
    for (int64_t i = nk; i < kDecodeChunk; ++i) out[i] = out[nk - 1];
  }

  // Pointers to head h of the code rows of nk slots (int8 decode reads codes directly; the scales are applied
  // to the scores and folded into P). Entries nk..kDecodeChunk repeat the last row, as in head_rows.
  void code_rows(const C* pool, const int64_t* slots, int64_t nk, int64_t h, const C** out) const {
    for (int64_t i = 0; i < nk; ++i) out[i] = pool + slots[i] * n.CW + h * n.D;
    for (int64_t i = nk; i < kDecodeChunk; ++i) out[i] = out[nk - 1];
  }

  // One query position s of row b, the query heads of KV heads [h0, h1), every key of [ka, kb) visible.
  // O [(h1 - h0) * G, D], m and l [(h1 - h0) * G] carry the online softmax (query head h0 * G + r is row r).
  // Each step reads kDecodeChunk token rows once, head after head, and prefetches the rows kPrefetchKeys
  // keys further on.
  void attend_query(int64_t b, int64_t s, int64_t h0, int64_t h1, int64_t ka, int64_t kb, Scratch& sc, float* O,
                    float* m, float* l) const {
    const int64_t G = n.G, D = n.D, heads = (h1 - h0) * G, c0 = h0 * D, c1 = h1 * D;
    float* qs = grow(sc.qt, heads * D);
    const T* qsrc = q + (b * n.S + s) * n.Hq * D + h0 * G * D;
    for (int64_t i = 0; i < heads * D; ++i) qs[i] = to_f32(qsrc[i]) * scale;
    float* p = grow(sc.st, heads * kDecodeChunk);  // scores, then probabilities: [heads, kDecodeChunk]
    float* buf = kQuantized<C> ? grow(sc.kbuf, kDecodeChunk * D) : nullptr;  // dequantized rows of one head
    int64_t slots[kDecodeChunk];
    const R* hrows[kDecodeChunk];
    const C* crows[kDecodeChunk];  // int8: the code rows themselves (see code_rows)

    Prefetcher pf = prefetcher(c0, c1);
    pf.steps = heads * (kDecodeChunk / kVec + 1) + (h1 - h0);  // micro-kernel calls per chunk
    for (int64_t n0 = ka; n0 < std::min(kb, ka + kPrefetchKeys); n0 += kDecodeChunk) {  // the first chunks: now
      pf.start(*this, b, n0, std::min(kDecodeChunk, kb - n0));
      pf.issue(kDecodeChunk);
    }
    for (int64_t n0 = ka; n0 < kb; n0 += kDecodeChunk) {
      const int64_t nk = std::min(kDecodeChunk, kb - n0), ahead = n0 + kPrefetchKeys;
      pf.start(*this, b, ahead, std::clamp<int64_t>(kb - ahead, 0, kDecodeChunk));
      key_slots(b, n0, nk, slots);
      for (int64_t h = h0; h < h1; ++h) {  // scores
        if constexpr (std::is_same_v<C, int8_t>) {  // int8: dot the codes themselves, then scale each key
          code_rows(k_pool, slots, nk, h, crows);
          for (int64_t r = (h - h0) * G; r < (h - h0 + 1) * G; ++r) {
            for (int64_t i = 0; i < nk; i += kVec) {
              dots(qs + r * D, D, crows + i, p + r * kDecodeChunk + i);
              pf.step();
            }
            for (int64_t i = 0; i < nk; ++i) p[r * kDecodeChunk + i] *= to_f32(k_scales[slots[i] * n.NS + h]);
          }
          continue;
        }
        head_rows(k_pool, k_scales, slots, nk, h, buf, hrows);
        for (int64_t r = (h - h0) * G; r < (h - h0 + 1) * G; ++r)
          for (int64_t i = 0; i < nk; i += kVec) {
            dots(qs + r * D, D, hrows + i, p + r * kDecodeChunk + i);
            pf.step();
          }
      }
      for (int64_t r = 0; r < heads; ++r) {  // online softmax; m_new is finite: every key is visible
        float* pr = p + r * kDecodeChunk;
        const float m_new = max_of(pr, nk, m[r]);
        const float alpha = exp_approx(m[r] - m_new);
        for (int64_t i = 0; i < nk; ++i) pr[i] -= m_new;
        exp_inplace(pr, nk);
        l[r] = l[r] * alpha + sum_of(pr, nk);
        if (m_new > m[r])
          for (int64_t d = 0; d < D; ++d) O[r * D + d] *= alpha;
        m[r] = m_new;
        pf.step();
      }
      for (int64_t h = h0; h < h1; ++h) {  // O += P V
        const int64_t r = (h - h0) * G;
        if constexpr (std::is_same_v<C, int8_t>) {  // int8: V's per-token scales folded into P, codes read as is
          float* ps = grow(sc.pscaled, G * kDecodeChunk);
          for (int64_t i = 0; i < nk; ++i) {
            const float vs = to_f32(v_scales[slots[i] * n.NS + h]);
            for (int64_t g = 0; g < G; ++g) ps[g * kDecodeChunk + i] = p[(r + g) * kDecodeChunk + i] * vs;
          }
          code_rows(v_pool, slots, nk, h, crows);
          group_times_rows(pv_heads, G, ps, kDecodeChunk, crows, D, nk, O + r * D);
        } else {
          head_rows(v_pool, v_scales, slots, nk, h, buf, hrows);
          group_times_rows(pv_heads, G, p + r * kDecodeChunk, kDecodeChunk, hrows, D, nk, O + r * D);
        }
        pf.step();
      }
      pf.issue(kDecodeChunk);
    }
  }

  // Row pointers (head h) of keys [n0, n0 + nk) of row b, as fp32 (see head_row_f32).
  void gather(int64_t b, int64_t h, int64_t n0, int64_t nk, Scratch& sc, const float** krows,
              const float** vrows) const {
    float* kbuf = grow(sc.kbuf, nk * n.D);
    float* vbuf = grow(sc.vbuf, nk * n.D);
    int64_t slots[kKeyTile];
    key_slots(b, n0, nk, slots);
    for (int64_t i = 0; i < nk; ++i) {
      krows[i] = head_row_f32(k_pool, k_scales, slots[i], h, kbuf + i * n.D);
      vrows[i] = head_row_f32(v_pool, v_scales, slots[i], h, vbuf + i * n.D);
    }
  }

  // Prefill: query positions [s0, s0 + npos) x the G heads of KV head h (row j = position * G + head),
  // keys [ka, kb) in tiles of kKeyTile, FlashAttention-2 online softmax. Scores are kept transposed,
  // S^T [keys, rows], so that the softmax statistics and the masks run along contiguous query rows.
  void attend_tiled(int64_t b, int64_t h, int64_t s0, int64_t npos, int64_t ka, int64_t kb, Scratch& sc, float* O,
                    float* m, float* l) const {
    const int64_t G = n.G, D = n.D, M = npos * G, Mp = round_up(M, kPanel);
    float* Qt = grow(sc.qt, D * Mp);  // Q^T [D, Mp], pre-scaled, zero in the padding columns
    for (int64_t j = 0; j < M; ++j) {
      const T* qr = q + (b * n.S + s0 + j / G) * n.Hq * D + (h * G + j % G) * D;
      for (int64_t d = 0; d < D; ++d) Qt[d * Mp + j] = to_f32(qr[d]) * scale;
    }
    for (int64_t d = 0; d < D; ++d) std::fill(Qt + d * Mp + M, Qt + (d + 1) * Mp, 0.0f);
    int64_t* lo = grow(sc.lo, Mp);
    int64_t* hi = grow(sc.hi, Mp);
    for (int64_t j = 0; j < Mp; ++j) {
      lo[j] = j < M ? key_lo(b, s0 + j / G) : 0;
      hi[j] = j < M ? key_hi(b, s0 + j / G) : 0;
    }
    float* St = grow(sc.st, round_up(kKeyTile, kKeyRows) * Mp);
    float* alpha = grow(sc.alpha, Mp);
    float* shift = grow(sc.shift, Mp);
    float* rowsum = grow(sc.rowsum, Mp);
    const float* zero = grow(sc.zero, D);
    std::fill(sc.zero.begin(), sc.zero.end(), 0.0f);
    const float** krows = grow(sc.krows, round_up(kKeyTile, kKeyRows));
    const float** vrows = grow(sc.vrows, round_up(kKeyTile, kKeyRows));

    for (int64_t n0 = ka; n0 < kb; n0 += kKeyTile) {
      const int64_t nk = std::min(kKeyTile, kb - n0), nk_padded = round_up(nk, kKeyRows);
      gather(b, h, n0, nk, sc, krows, vrows);
      for (int64_t i = nk; i < nk_padded; ++i) krows[i] = vrows[i] = zero;
      for (int64_t i0 = 0; i0 < nk_padded; i0 += kKeyRows)
        for (int64_t j0 = 0; j0 < Mp; j0 += kPanel)
          rows_times_panel<kKeyRows, 2>(krows + i0, Qt + j0, Mp, D, St + i0 * Mp + j0, Mp);
      if (!(lo[M - 1] <= n0 && n0 + nk <= hi[0])) {  // a tile on the diagonal or the window's edge
        for (int64_t j = 0; j < Mp; ++j) {
          const int64_t a = std::clamp<int64_t>(lo[j] - n0, 0, nk);
          const int64_t e = std::clamp<int64_t>(hi[j] - n0, a, nk);
          for (int64_t i = 0; i < a; ++i) St[i * Mp + j] = kNegInf;
          for (int64_t i = e; i < nk; ++i) St[i * Mp + j] = kNegInf;
        }
      }
      // Online softmax, one column per query row.
      for (int64_t j = 0; j < Mp; ++j) alpha[j] = m[j];
      for (int64_t i = 0; i < nk; ++i)
        for (int64_t j = 0; j < Mp; ++j) alpha[j] = std::max(alpha[j], St[i * Mp + j]);  // new max
      for (int64_t j = 0; j < Mp; ++j) {
        const float m_new = alpha[j];
        shift[j] = m_new == kNegInf ? 0.0f : m_new;  // a row with no visible key yet keeps p = 0
        alpha[j] = m[j] - shift[j];
        m[j] = m_new;
        rowsum[j] = 0.0f;
      }
      exp_inplace(alpha, Mp);
      for (int64_t i = 0; i < nk; ++i) {
        float* row = St + i * Mp;
        for (int64_t j = 0; j < Mp; ++j) row[j] -= shift[j];
        exp_inplace(row, Mp);
        for (int64_t j = 0; j < Mp; ++j) rowsum[j] += row[j];
      }
      for (int64_t j = 0; j < Mp; ++j) l[j] = l[j] * alpha[j] + rowsum[j];
      for (int64_t j = 0; j < M; ++j)
        for (int64_t d = 0; d < D; ++d) O[j * D + d] *= alpha[j];
      times_rows_any<kQueryRows, 2>(M, St, 1, Mp, vrows, D, nk, O, D);  // O += P V, with P read from S^T
    }
  }

  void store_row(T* out, const float* acc, float inv) const {
    for (int64_t d = 0; d < n.D; ++d) out[d] = from_f32<T>(acc[d] * inv);
  }

  // Prefill tile row j (position s0 + j / G, query head h * G + j % G).
  void write_row(int64_t b, int64_t h, int64_t s0, int64_t j, const float* acc, float inv) const {
    store_row(o + (b * n.S + s0 + j / n.G) * n.Hq * n.D + (h * n.G + j % n.G) * n.D, acc, inv);
  }

  void write_output(int64_t b, int64_t h, int64_t s0, int64_t npos, const float* O, const float* l) const {
    for (int64_t j = 0; j < npos * n.G; ++j) write_row(b, h, s0, j, O + j * n.D, l[j] > 0.0f ? 1.0f / l[j] : 0.0f);
  }

  // Merges `count` partial softmaxes of one query row: O_s at O + s * stride, m_s at m + s * stride, l_s at
  // l + s * stride. Writes the normalized row to out.
  void merge_row(const float* O, const float* m, const float* l, int64_t stride, int64_t count, T* out) const {
    float* acc = grow(call->acc, n.D);
    float m_max = kNegInf;
    for (int64_t s = 0; s < count; ++s) m_max = std::max(m_max, m[s * stride]);
    std::fill(acc, acc + n.D, 0.0f);
    float l_sum = 0.0f;
    for (int64_t s = 0; s < count && m_max != kNegInf; ++s) {
      const float w = exp_approx(m[s * stride] - m_max);
      l_sum += w * l[s * stride];
      for (int64_t d = 0; d < n.D; ++d) acc[d] += w * O[s * stride + d];
    }
    store_row(out, acc, l_sum > 0.0f ? 1.0f / l_sum : 0.0f);
  }

  // ---- step 4 (split keys only): merge the partial softmaxes of the pieces of each split row (decode) or
  // of the splits of each (tile, row, head) (prefill).
  void combine() const {
    const int64_t stride = partial_stride(), D = n.D, Hq = n.Hq;
    if (decode) {
      for (const SplitRow& row : call->splits) {
        const float* first = call->partial.data() + row.first_slot * stride;
        for (int64_t h = 0; h < Hq; ++h)
          merge_row(first + h * D, first + Hq * D + h, first + Hq * (D + 1) + h, stride, row.count,
                    o + (row.b * Hq + h) * D);
      }
      return;
    }
    if (num_splits == 1) return;
    const int64_t groups = num_items() / num_splits;
    for (int64_t group = 0; group < groups; ++group) {
      const int64_t h = group % n.Hkv, b = group / n.Hkv % n.B, qt = num_q_tiles - 1 - group / (n.Hkv * n.B);
      const int64_t s0 = qt * q_tile;
      const int64_t npos = std::max<int64_t>(0, std::min(s0 + q_tile, real_len(b)) - s0);
      const float* first = call->partial.data() + group * num_splits * stride;
      for (int64_t j = 0; j < npos * n.G; ++j) {
        T* out = o + (b * n.S + s0 + j / n.G) * Hq * D + (h * n.G + j % n.G) * D;
        merge_row(first + j * D, first + partial_rows * D + j, first + partial_rows * (D + 1) + j, stride,
                  num_splits, out);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------ validation

template <typename C>
std::string check_attributes(const Attributes& a) {
  if (std::string err = check_head_attributes(a); !err.empty()) return err;
  if (a.kv_format != kv_format_name<C>())
    return message("kv_format '", a.kv_format, "' does not match the ", kv_format_name<C>(),
                   " KV cache (kv_format must be '", kv_format_name<C>(), "')");
  return {};
}

// Inputs and outputs of the node: 9 and 3, or 12 and 5 with a quantized pool (the scales and K's means).
constexpr size_t kInputs = 9, kQuantInputs = 12, kOutputs = 3, kQuantOutputs = 5;
template <typename C>
constexpr size_t num_inputs() { return kQuantized<C> ? kQuantInputs : kInputs; }
template <typename C>
constexpr size_t num_outputs() { return kQuantized<C> ? kQuantOutputs : kOutputs; }

// A quantized pool's codes, scales and K channel means (inputs 3, 4, 9, 10, 11) against W = Hkv * D.
template <typename C>
std::string check_quantized_shapes(const Shapes& s, Sizes& n) {
  const char* format = kv_format_name<C>();
  n.group = group_size<C>(n.D);
  if (n.W % n.group != 0)
    return message(format, " KV needs num_kv_heads * head_dim = ", n.Hkv, " * ", n.D, " = ", n.W,
                   " to be a multiple of the group of ", n.group, " channels per scale");
  n.NS = n.W / n.group;
  if (n.CW != code_width<C>(n.W))
    return message("k_cache width ", n.CW, " != the ", format, " code width of num_kv_heads * head_dim = ", n.Hkv,
                   " * ", n.D, " channels: ", code_width<C>(n.W), " (head_dim from q)");
  const std::vector<int64_t> scales{n.NB, n.BS, n.NS};
  for (size_t i : {9, 10})
    if (s[i] != scales)
      return message(i == 9 ? "k_scale" : "v_scale", " shape ", shape_str(s[i]),
                     " != [num_blocks, block_size, num_kv_heads * head_dim / group] = ", shape_str(scales), " (",
                     format, ": one scale per ", n.group, " channels)");
  if (s[11] != std::vector<int64_t>{n.W})
    return message("k_mean shape ", shape_str(s[11]), " != [num_kv_heads * head_dim] = [", n.W, "]");
  return {};
}

template <typename C>
std::string check_shapes(const Attributes& a, const Shapes& s, Sizes& n) {
  static const char* names[] = {"q", "k", "v", "k_cache", "v_cache", "block_table", "slot_mapping", "past_lens",
                                "total_lens", "k_scale", "v_scale", "k_mean"};
  static const size_t ranks[] = {3, 3, 3, 3, 3, 2, 2, 1, 1, 3, 3, 1};
  for (size_t i = 0; i < num_inputs<C>(); ++i)
    if (s[i].size() != ranks[i])
      return message(names[i], " must have rank ", ranks[i], ", got shape ", shape_str(s[i]));
  n.B = s[0][0], n.S = s[0][1], n.Hq = a.num_heads, n.Hkv = a.num_kv_heads, n.G = n.Hq / n.Hkv;
  n.NB = s[3][0], n.BS = s[3][1], n.CW = s[3][2], n.MB = s[5][1];
  if (n.BS <= 0) return message("k_cache block_size must be > 0, got shape ", shape_str(s[3]));
  if (s[0][2] % n.Hq != 0 || s[0][2] == 0)
    return message("q width ", s[0][2], " is not a positive multiple of num_heads=", n.Hq);
  n.D = s[0][2] / n.Hq;
  n.W = n.Hkv * n.D;
  if constexpr (kQuantized<C>) {
    if (std::string err = check_quantized_shapes<C>(s, n); !err.empty()) return err;
  } else if (n.CW != n.W) {
    return message("k_cache width ", n.CW, " != num_kv_heads * head_dim = ", n.Hkv, " * ", n.D, " (head_dim from q)");
  }
  if (s[4] != s[3]) return message("v_cache shape ", shape_str(s[4]), " != k_cache shape ", shape_str(s[3]));
  for (size_t i : {1, 2})
    if (s[i] != std::vector<int64_t>{n.B, n.S, n.W})
      return message(names[i], " shape ", shape_str(s[i]), " != [B, S, num_kv_heads * head_dim] = ",
                     shape_str({n.B, n.S, n.W}));
  if (s[5][0] != n.B) return message("block_table shape ", shape_str(s[5]), " has ", s[5][0], " rows, q has B=", n.B);
  if (s[6] != std::vector<int64_t>{n.B, n.S})
    return message("slot_mapping shape ", shape_str(s[6]), " != [B, S] = ", shape_str({n.B, n.S}));
  for (size_t i : {7, 8})
    if (s[i][0] != n.B) return message(names[i], " shape ", shape_str(s[i]), " != [B] = [", n.B, "]");
  return {};
}

// The index inputs' values: every pool access must stay inside the pool.
std::string check_indices(const Sizes& n, const int32_t* table, const int64_t* slots, const int32_t* past,
                          const int32_t* total) {
  const int64_t num_slots = n.NB * n.BS;
  for (int64_t t = 0; t < n.B * n.S; ++t)
    if (slots[t] < 0 || slots[t] >= num_slots)
      return message("slot_mapping[", t / n.S, ", ", t % n.S, "] = ", slots[t], " is out of range [0, ", num_slots,
                     ") (num_blocks=", n.NB, " * block_size=", n.BS, ")");
  for (int64_t b = 0; b < n.B; ++b) {
    if (past[b] < 0) return message("past_lens[", b, "] = ", past[b], " is negative");
    if (total[b] < past[b] || total[b] > past[b] + n.S)
      return message("total_lens[", b, "] = ", total[b], " is not past_lens + new tokens: it must lie in [", past[b],
                     ", ", past[b] + n.S, "] (past_lens[", b, "] = ", past[b], ", S = ", n.S, ")");
    const int64_t blocks = (int64_t{total[b]} + n.BS - 1) / n.BS;
    if (blocks > n.MB)
      return message("block_table too narrow: total_lens[", b, "] = ", total[b], " needs ", blocks,
                     " blocks of block_size=", n.BS, ", block_table has ", n.MB, " columns");
    for (int64_t i = 0; i < blocks; ++i)
      if (table[b * n.MB + i] < 0 || table[b * n.MB + i] >= n.NB)
        return message("block_table[", b, ", ", i, "] = ", table[b * n.MB + i], " is out of range [0, ", n.NB,
                       ") (num_blocks)");
  }
  return {};
}

// A variant's node: 9 inputs and 3 outputs, or, over a quantized pool, 12 and 5.
template <typename C>
std::string check_io_counts(size_t inputs, size_t outputs) {
  if (inputs == num_inputs<C>() && outputs == num_outputs<C>()) return {};
  if constexpr (kQuantized<C>)
    return message("a ", kv_format_name<C>(), " KV cache needs 12 inputs (q, k, v, k_cache, v_cache, block_table, "
                   "slot_mapping, past_lens, total_lens, k_scale, v_scale, k_mean) and 5 outputs (o, k_cache_out, "
                   "v_cache_out, k_scale_out, v_scale_out), got ", inputs, " and ", outputs);
  else
    return message("a ", kv_format_name<C>(), " KV cache takes 9 inputs and 3 outputs, got ", inputs, " and ",
                   outputs, " (k_scale, v_scale, k_mean and the scale outputs are for int8/int4 caches)");
}

// ------------------------------------------------------------------------------------------------ ORT glue

constexpr char kOpName[] = "FlashAttention";

OrtStatusPtr error_status(OrtErrorCode code, const std::string& what) { return op_error(kOpName, code, what); }

template <typename T, typename C>
struct FlashAttentionKernel {
  Attributes attrs;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) const noexcept {
    return compute_status(kOpName, [&] { return Compute(raw_context); });
  }

  OrtStatusPtr Compute(OrtKernelContext* raw_context) const {
    Ort::KernelContext context(raw_context);
    Shapes shapes(num_inputs<C>());
    for (size_t i = 0; i < shapes.size(); ++i) shapes[i] = context.GetInput(i).GetTensorTypeAndShapeInfo().GetShape();
    Job<T, C> job;
    if (std::string err = check_shapes<C>(attrs, shapes, job.n); !err.empty())
      return error_status(ORT_INVALID_ARGUMENT, err);
    job.block_table = context.GetInput(5).GetTensorData<int32_t>();
    job.slot_mapping = context.GetInput(6).GetTensorData<int64_t>();
    job.past = context.GetInput(7).GetTensorData<int32_t>();
    job.total = context.GetInput(8).GetTensorData<int32_t>();
    if (std::string err = check_indices(job.n, job.block_table, job.slot_mapping, job.past, job.total); !err.empty())
      return error_status(ORT_INVALID_ARGUMENT, err);

    auto o = context.GetOutput(0, shapes[0]);
    const size_t pool_bytes = static_cast<size_t>(job.n.NB * job.n.BS * job.n.CW) * sizeof(C);
    if (pool_bytes == 0) return nullptr;  // then B * S == 0 too: a slot would have been out of range
    job.k_pool = pool_output<C>(context, 1, 3, shapes, pool_bytes);
    job.v_pool = pool_output<C>(context, 2, 4, shapes, pool_bytes);
    if constexpr (kQuantized<C>) {
      const size_t scale_bytes = static_cast<size_t>(job.n.NB * job.n.BS * job.n.NS) * sizeof(half);
      job.k_scales = pool_output<half>(context, 3, 9, shapes, scale_bytes);
      job.v_scales = pool_output<half>(context, 4, 10, shapes, scale_bytes);
      job.k_mean = context.GetInput(11).GetTensorData<float>();
    }
    if (job.n.B * job.n.S == 0) return nullptr;

    job.q = context.GetInput(0).GetTensorData<T>();
    job.k = context.GetInput(1).GetTensorData<T>();
    job.v = context.GetInput(2).GetTensorData<T>();
    job.o = o.GetTensorMutableData<T>();
    job.scale = attrs.scale;
    job.causal = attrs.causal != 0;
    job.window = attrs.sliding_window;
    job.call = &call_scratch();
    job.write_new_kv();
    job.plan();
    run_items(raw_context, job);
    job.combine();
    return nullptr;
  }
};

template <typename T, typename C>
struct FlashAttentionOp : Ort::CustomOpBase<FlashAttentionOp<T, C>, FlashAttentionKernel<T, C>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const noexcept {
    const char* required = "num_heads, num_kv_heads, scale, causal, sliding_window, kv_format";
    return create_status(kOpName, required, [&]() -> OrtStatusPtr {
      Ort::ConstKernelInfo ki(info);
      const Attributes a = read_attributes(ki);
      if (std::string err = check_attributes<C>(a); !err.empty()) return error_status(ORT_INVALID_ARGUMENT, err);
      if (std::string err = check_io_counts<C>(ki.GetInputCount(), ki.GetOutputCount()); !err.empty())
        return error_status(ORT_INVALID_ARGUMENT, err);
      *kernel = new FlashAttentionKernel<T, C>{a};
      return nullptr;
    });
  }

  // ORT requires every op of one name to declare the same inputs and outputs (else no session of the domain
  // loads, checked with 1.30 and 1.32): all variants declare the quantized node's 12 inputs and 5 outputs, the
  // last 3 inputs and 2 outputs optional. ORT then picks the variant by the types of the inputs present, and
  // CreateKernelV2 checks that a variant got the counts it needs (check_io_counts).
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kQuantInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 0: case 1: case 2: return onnx_type<T>();
      case 3: case 4: return onnx_type<C>();
      case 6: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      case 9: case 10: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;  // k_scale, v_scale
      case 11: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;            // k_mean
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < kInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return kQuantOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    if (index == 0) return onnx_type<T>();
    return index < kOutputs ? onnx_type<C>() : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index < kOutputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace
}  // namespace fastattention

// Called by SessionOptions.register_custom_ops_library. Registers the type variants of FlashAttention: fp32,
// fp16, fp32 activations over an fp16 KV cache, and fp32 activations over an int8 (int8 codes) or int4 (uint8
// codes) cache; then those of FlashAttentionSaq (saq_cpu.cc).
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace fastattention;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "fastattention: this library needs onnxruntime >= 1.29");
  Ort::InitApi(api);
  static FlashAttentionOp<float, float> op_fp32;
  static FlashAttentionOp<half, half> op_fp16;
  static FlashAttentionOp<float, half> op_fp32_kv_fp16;
  static FlashAttentionOp<float, int8_t> op_fp32_kv_int8;
  static FlashAttentionOp<float, uint8_t> op_fp32_kv_int4;
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;  // must outlive every session that uses them
  try {
    Ort::CustomOpDomain domain{"fastattention"};
    domain.Add(&op_fp32);
    domain.Add(&op_fp16);
    domain.Add(&op_fp32_kv_fp16);
    domain.Add(&op_fp32_kv_int8);
    domain.Add(&op_fp32_kv_int4);
    add_saq_ops(domain);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
