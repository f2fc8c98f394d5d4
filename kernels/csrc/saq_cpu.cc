// Native CPU kernel of the ONNX custom op fastattention::FlashAttentionSaq (domain "fastattention", version 1):
// attention over the SAQ staircase KV cache, then the cache's update.
//
// Contract: kernels/kv_saq.py, paged_attention_saq_ref; byte layout: kernels/kv_formats.py, SaqFormat. This
// kernel must match them; the comparison is tests/kernels/test_attention_cpu_saq.py, run on random inputs.
//   inputs   0 q [B, S, Hq*D] T     1 k [B, S, W] T     2 v [B, S, W] T     (W = Hkv*D; T float or float16)
//            3 kv_pool uint8 [NB, block_bytes]: one bottom-stair record per block (block_table names them)
//            4 kv_slots uint8 [NSL, slot_bytes]: per sequence, the open stage (fp16 K and V tails), the token
//              sinks (fp16 K and V rows of the first sink_tokens positions), the sink records and the upper
//              stairs' rings
//            5 block_table int32 [B, MB] (column j: logical stage j's block)   6 slot_mapping int64 [B, S] (unused)
//            7 past_lens int32 [B]   8 total_lens int32 [B]   9 seq_slots int32 [B] (row b's slot)
//   outputs  o [B, S, Hq*D] T, kv_pool_out, kv_slots_out (the updated pools, shaped as the inputs)
//   attrs    num_heads, num_kv_heads, scale, causal, sliding_window (0 = none), kv_format ("saq"), saq (the
//            format's spec, SaqFormat.text(); block_bytes and slot_bytes must be what it gives for W)
// Row b's new tokens are the first total - past of its S rows; the rest are padding (never written; their
// queries output zeros, as FlashAttention's do). Masking is bottom-right aligned, as in FlashAttention: query s
// of row b sits at position past + s and sees key j < total when (causal) j <= past + s and (window w > 0)
// past + s - j < w. Attention reads positions < past from the cache as it was before this call, positions >=
// past from the new K/V rounded to fp16; then the write: the open stage's rows and the new tokens form one run,
// every stage it completes closes (older stages step down the stairs, bottom-most first), the rest is the tail.
// Token sinks: when stage 0 closes, its first sink_tokens rows are kept fp16 in the slot's sink rows and its
// record is quantized with row sink_tokens copied over them; once stage 0 has closed, positions < sink_tokens
// are read from the sink rows, the rest of stage 0 from its record.
// In place: the runtime binds each pool as both input and output; if ORT hands us another output buffer, the
// input pool is copied into it first.
//
// The file reads top to bottom: code unpacking micro-kernels -> the job (plan, attention items, combine, write)
// -> validation -> ORT glue. The format (the spec text parsed as SaqFormat.parse does, the byte layout) and the
// quantization of records (encoded and decoded exactly as the spec) are in saq_format.h. Numerics,
// micro-kernels, the parallel-for and the ORT error glue come from fastattention_cpu.h (shared with
// FlashAttention).
//
// How it runs. The codes are read where they lie; nothing dequantizes the whole cache. A work item is (row,
// tile of query positions, contiguous key range) and covers every KV head, so each key chunk's records (K and
// V codes of all heads side by side) are read once, front to back. Keys go in chunks of at most kChunk that
// never cross a stage (nor, once stage 0 has closed, position sink_tokens). Q K^T: a closed stage's chunk of K is
// unpacked head by head into a small fp32 buffer (lo + code * scale per channel; vpermd + vpsrlvd on AVX-512) that
// FlashAttention's `dots` micro-kernel reads; fp16 rows (the token sinks' and the open stage's in the slot, the new
// tokens rounded once per call) are widened into it. Online softmax per chunk. P V: V is quantized per token per
// group, so within a group P V = (P * scale) codes + P * lo, and `codes_times_rows` streams the codes themselves
// (no buffer) while the output rows stay in registers; heads whose groups are not whole vectors dequantize V into a
// buffer instead. Long contexts are split into key ranges until every hardware thread has kItemsPerThread items; the
// partial softmaxes are merged at the end. Then the write, one row per item (a row's closes are sequential: each
// stage's cascade must see the previous one's); closing a stage quantizes kVec groups at once (K: channels side by
// side; V: tokens). Chunk and split sizes follow FlashAttention's decode. Measured on a 2-vCPU Zen 4 VM (AVX-512),
// 2026-11, one thread, caches warm: a decode step at 4k context (9 / 3 heads, D 64, default spec) takes 1.24-1.29x
// the fp16-pool FlashAttention's time (about 290 vs 230 us) for 4.3x fewer KV bytes; a step that closes a stage
// about 0.8 ms. To re-tune, change kChunk, kItemsPerThread, kMinSplitKeys and time both ops in one process.

#include "fastattention_cpu.h"
#include "saq_format.h"

#include <memory>

namespace fastattention {
namespace {

// ------------------------------------------------------------------------------------------------ code unpacking

typedef uint32_t vuint __attribute__((vector_size(kVec * sizeof(uint32_t))));

// The 32-bit words holding kVec codes of BITS bits from byte p: lane I gets word I * BITS / 32. (x86-64 permutes
// the loaded words with vpermd: g++ 12 lowers the shufflevector of a narrower vector through the stack, and the
// store-forwarding stall made 4- and 8-bit stages 3x slower to unpack than 2-bit ones.)
template <int BITS, size_t... I>
inline vuint code_words(const uint8_t* p, std::index_sequence<I...>) {
  constexpr int bytes = kVec * BITS / 8;
  vuint spread;
#if defined(__AVX512F__) || defined(__AVX2__)
  __m128i x;
  if constexpr (bytes == 16) {
    x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    uint64_t w = 0;
    std::memcpy(&w, p, bytes);
    x = _mm_cvtsi64_si128(static_cast<long long>(w));
  }
  const vint lanes = {static_cast<int32_t>(I * BITS / 32)...};
#if defined(__AVX512F__)
  __m512i index;
  std::memcpy(&index, &lanes, sizeof index);
  const __m512i s = _mm512_permutexvar_epi32(index, _mm512_zextsi128_si512(x));
#else
  __m256i index;
  std::memcpy(&index, &lanes, sizeof index);
  const __m256i s = _mm256_permutevar8x32_epi32(_mm256_zextsi128_si256(x), index);
#endif
  std::memcpy(&spread, &s, sizeof spread);
#else
  vuint words = {};
  std::memcpy(&words, p, bytes);
  spread = __builtin_shufflevector(words, words, static_cast<int>(I * BITS / 32)...);
#endif
  return spread;
}

// kVec codes of BITS bits starting at byte p (channel order, the first in the low bits), as fp32: each lane
// shifts its word by its own amount (vpsrlvd on x86-64) and masks.
template <int BITS, size_t... I>
inline vfloat load_codes(const uint8_t* p, std::index_sequence<I...> lanes) {
  const vuint spread = code_words<BITS>(p, lanes);
  const vuint shift = {static_cast<uint32_t>(I * BITS % 32)...};
  const vuint codes = (spread >> shift) & static_cast<uint32_t>((1 << BITS) - 1);
  vint x;
  std::memcpy(&x, &codes, sizeof x);
  return to_vfloat(x);
}
template <int BITS>
inline vfloat load_codes(const uint8_t* p) { return load_codes<BITS>(p, std::make_index_sequence<kVec>{}); }

// K rows of one head: out[t][0 : D] = lo + code * scale for channels [c0, c0 + D) of nk code rows.
template <int BITS>
void dequantize_k(const uint8_t* codes, int64_t row_bytes, int64_t nk, int64_t c0, int64_t D, const float* lo,
                  const float* scale, float* out) {
  for (int64_t t = 0; t < nk; ++t, out += D) {
    const uint8_t* row = codes + t * row_bytes;
    int64_t d = 0;
    if (c0 * BITS % 8 == 0)  // the head starts on a byte: whole vectors of codes
      for (; d + kVec <= D; d += kVec)
        vstore(out + d, vload(lo + d) + load_codes<BITS>(row + (c0 + d) * BITS / 8) * vload(scale + d));
    for (; d < D; ++d) out[d] = lo[d] + static_cast<float>(code_at(row, c0 + d, BITS)) * scale[d];
  }
}

// V rows of one head: lo and scale per token per group of `group` channels ([nk, groups] fp16). A vector of
// channels inside one group (and starting on a byte) is unpacked whole, with its group's lo and scale.
template <int BITS>
void dequantize_v(const uint8_t* codes, int64_t row_bytes, const half* lo, const half* scale, int64_t groups,
                  int64_t group, int64_t nk, int64_t c0, int64_t D, float* out) {
  constexpr int64_t kMaxVectors = 64;
  int64_t vector_group[kMaxVectors];  // per vector of the head: its group, or -1 (unpacked channel by channel)
  const int64_t vectors = std::min(D / kVec, kMaxVectors);
  for (int64_t i = 0; i < vectors; ++i) {
    const int64_t c = c0 + i * kVec;
    vector_group[i] = c * BITS % 8 == 0 && c / group == (c + kVec - 1) / group ? c / group : -1;
  }
  for (int64_t t = 0; t < nk; ++t, out += D) {
    const uint8_t* row = codes + t * row_bytes;
    const half* lo_t = lo + t * groups;
    const half* scale_t = scale + t * groups;
    vfloat lo_g = {}, scale_g = {};
    for (int64_t i = 0, last = -1; i < vectors; ++i) {
      const int64_t g = vector_group[i];
      if (g >= 0) {
        if (g != last) lo_g = vfloat{} + to_f32(lo_t[g]), scale_g = vfloat{} + to_f32(scale_t[g]), last = g;
        vstore(out + i * kVec, lo_g + load_codes<BITS>(row + (c0 + i * kVec) * BITS / 8) * scale_g);
        continue;
      }
      for (int64_t d = i * kVec; d < (i + 1) * kVec; ++d) {
        const int64_t gd = (c0 + d) / group;
        out[d] = to_f32(lo_t[gd]) + static_cast<float>(code_at(row, c0 + d, BITS)) * to_f32(scale_t[gd]);
      }
    }
    for (int64_t d = vectors * kVec; d < D; ++d) {
      const int64_t gd = (c0 + d) / group;
      out[d] = to_f32(lo_t[gd]) + static_cast<float>(code_at(row, c0 + d, BITS)) * to_f32(scale_t[gd]);
    }
  }
}

// P V straight from V's codes (no dequantized copy): c[r][col : col + NP * kVec] += sum_k a[r * a_rs + k] *
// code[k][col : ...] for MR rows, code rows of row_bytes from `codes` (FlashAttention's strided_times_rows,
// the row vectors unpacked as they are loaded).
template <int MR, int NP, int BITS>
inline void codes_times_rows(const float* a, int64_t a_rs, const uint8_t* codes, int64_t row_bytes, int64_t col,
                             int64_t K, float* c, int64_t ldc) {
  vfloat acc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = vload(c + r * ldc + p * kVec);
  for (int64_t k = 0; k < K; ++k) {
    const uint8_t* row = codes + k * row_bytes + col * BITS / 8;
    vfloat bv[NP];
    for (int p = 0; p < NP; ++p) bv[p] = load_codes<BITS>(row + p * kVec * BITS / 8);
    for (int r = 0; r < MR; ++r) {
      const float ar = a[r * a_rs + k];
      for (int p = 0; p < NP; ++p) acc[r][p] += ar * bv[p];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) vstore(c + r * ldc + p * kVec, acc[r][p]);
}

// The same for `rows` rows (NG at a time, NG divides rows) over channels [col, col + width), width a multiple of
// kVec: NP vectors of NG rows' outputs stay in registers while the code rows stream by.
template <int NG, int BITS>
void rows_times_codes(int64_t rows, const float* a, int64_t a_rs, const uint8_t* codes, int64_t row_bytes,
                      int64_t col, int64_t width, int64_t K, float* c, int64_t ldc) {
  constexpr int NP = std::max(1, std::min(4, kAccumulators / NG));
  for (int64_t r = 0; r < rows; r += NG) {
    int64_t x = 0;
    for (; x + NP * kVec <= width; x += NP * kVec)
      codes_times_rows<NG, NP, BITS>(a + r * a_rs, a_rs, codes, row_bytes, col + x, K, c + r * ldc + x, ldc);
    for (; x < width; x += kVec)
      codes_times_rows<NG, 1, BITS>(a + r * a_rs, a_rs, codes, row_bytes, col + x, K, c + r * ldc + x, ldc);
  }
}

template <int BITS>
void rows_times_codes(int ng, int64_t rows, const float* a, int64_t a_rs, const uint8_t* codes, int64_t row_bytes,
                      int64_t col, int64_t width, int64_t K, float* c, int64_t ldc) {
  switch (ng) {
    case 8: return rows_times_codes<8, BITS>(rows, a, a_rs, codes, row_bytes, col, width, K, c, ldc);
    case 7: return rows_times_codes<7, BITS>(rows, a, a_rs, codes, row_bytes, col, width, K, c, ldc);
    case 6: return rows_times_codes<6, BITS>(rows, a, a_rs, codes, row_bytes, col, width, K, c, ldc);
    case 5: return rows_times_codes<5, BITS>(rows, a, a_rs, codes, row_bytes, col, width, K, c, ldc);
    case 4: return rows_times_codes<4, BITS>(rows, a, a_rs, codes, row_bytes, col, width, K, c, ldc);
    case 3: return rows_times_codes<3, BITS>(rows, a, a_rs, codes, row_bytes, col, width, K, c, ldc);
    case 2: return rows_times_codes<2, BITS>(rows, a, a_rs, codes, row_bytes, col, width, K, c, ldc);
    default: return rows_times_codes<1, BITS>(rows, a, a_rs, codes, row_bytes, col, width, K, c, ldc);
  }
}

// ------------------------------------------------------------------------------------------------ the job

constexpr int64_t kChunk = 64;          // keys per step of the online softmax (a multiple of kVec)
constexpr int64_t kRowsPerTile = 64;    // prefill: query rows (positions x group heads) of one KV head per item
constexpr int64_t kItemsPerThread = 2;  // split key ranges until each hardware thread has this many items
constexpr int64_t kMinSplitKeys = 256;  // but keep at least this many keys per piece
static_assert(kChunk % kVec == 0, "chunks are whole micro-kernel calls");

// Per-thread buffers of an attention item, grown on demand and reused across calls.
struct AttendScratch {
  std::vector<float> qs, p, ps, k, v, lo, scale, token_lo, token_scale, acc;
};

AttendScratch& attend_scratch() {
  thread_local AttendScratch scratch;
  return scratch;
}

// A tile of query positions [s0, s0 + npos) of row b, split into `pieces` key ranges: partial slots
// [first_slot, first_slot + pieces).
struct Tile {
  int64_t b, s0, npos, first_slot, pieces;
};
// A work item: keys [ka, kb) of one tile, its partial softmax in slot `slot`.
struct Item {
  int64_t tile, ka, kb, slot;
};

struct CallScratch {
  std::vector<Tile> tiles;
  std::vector<Item> items;
  std::vector<float> partial;
  std::vector<half> k16, v16;  // fp32 activations: the new K/V rounded to fp16
};

CallScratch& call_scratch() {
  thread_local CallScratch scratch;
  return scratch;
}

// Where a chunk of nk keys comes from: tokens [t0, t0 + nk) of a closed stage's record, or fp16 rows (row stride
// W): the token sinks' or the open stage's in the slot, or the new tokens.
struct KeyChunk {
  const uint8_t* record;  // nullptr: fp16 rows
  int bits;
  int64_t t0, nk;
  const half* k_rows;
  const half* v_rows;
};

template <typename T>
struct Job {
  SaqFormat fmt;
  int64_t B = 0, S = 0, Hq = 0, Hkv = 0, G = 0, D = 0, W = 0, NB = 0, NSL = 0, MB = 0;
  float scale = 1.0f;
  bool causal = true;
  int64_t window = 0;
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  const half* k16 = nullptr;  // k and v rounded to fp16 (round_new_tokens)
  const half* v16 = nullptr;
  const int32_t* block_table = nullptr;
  const int32_t* past = nullptr;
  const int32_t* total = nullptr;
  const int32_t* seq_slots = nullptr;
  uint8_t* pool = nullptr;  // the output pools
  uint8_t* slots = nullptr;
  T* o = nullptr;
  CallScratch* call = nullptr;
  int64_t q_tile = 1, flops = 0;
  bool values_from_codes = false;  // every V group of a head is whole vectors: P V reads V's codes (plan)

  int64_t real_len(int64_t b) const { return int64_t{total[b]} - past[b]; }
  int64_t key_lo(int64_t b, int64_t s) const {
    return window > 0 ? std::max<int64_t>(0, past[b] + s - window + 1) : 0;
  }
  int64_t key_hi(int64_t b, int64_t s) const {
    return causal ? std::min<int64_t>(total[b], past[b] + s + 1) : int64_t{total[b]};
  }
  uint8_t* slot(int64_t b) const { return slots + int64_t{seq_slots[b]} * fmt.slot_bytes(); }
  int64_t num_items() const { return static_cast<int64_t>(call->items.size()); }
  int64_t tile_rows() const { return q_tile * Hq; }
  int64_t partial_stride() const { return tile_rows() * (D + 2); }  // O [rows, D], m [rows], l [rows]

  // Logical stage j of row b on stair `stair`: its sink record, its ring entry, or its paged block (bottom stair).
  uint8_t* record(int64_t b, size_t stair, int64_t j) const {
    if (j < fmt.sink) return slot(b) + fmt.sink_offset() + j * fmt.record_bytes(fmt.bits[0]);
    if (stair == fmt.top()) return pool + int64_t{block_table[b * MB + j]} * fmt.block_bytes();
    return slot(b) + fmt.ring[stair] + (j % fmt.stages[stair]) * fmt.record_bytes(fmt.bits[stair]);
  }

  // ---- step 1: the new K/V as the cache holds them (fp16), then tiles of query positions, split into key
  // ranges (items).
  void round_new_tokens() {
    if constexpr (std::is_same_v<T, half>) {
      k16 = k, v16 = v;
    } else {
      half* kr = grow(call->k16, B * S * W);
      half* vr = grow(call->v16, B * S * W);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = b * S * W; i < (b * S + real_len(b)) * W; ++i)
          kr[i] = from_f32<half>(k[i]), vr[i] = from_f32<half>(v[i]);
      k16 = kr, v16 = vr;
    }
  }

  void plan() {
    for (int64_t b = 0; b < B; ++b) {
      flops += 4 * real_len(b) * total[b] * Hq * D;
      std::memset(o + (b * S + real_len(b)) * Hq * D, 0, (S - real_len(b)) * Hq * D * sizeof(T));  // padding
    }
    q_tile = S == 1 ? 1 : std::max<int64_t>(1, kRowsPerTile / G);
    values_from_codes = D % kVec == 0 && fmt.v_group % kVec == 0;
    std::vector<Tile>& tiles = call->tiles;
    std::vector<Item>& items = call->items;
    tiles.clear();
    items.clear();
    int64_t keys = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s0 = 0; s0 < real_len(b); s0 += q_tile) {
        const int64_t npos = std::min(q_tile, real_len(b) - s0);
        tiles.push_back({b, s0, npos, 0, 0});
        keys += key_hi(b, s0 + npos - 1) - key_lo(b, s0);
      }
    const int64_t wanted = flops >= kMinParallelFlops ? kItemsPerThread * hardware_threads() : 1;
    const int64_t piece_keys = std::max(kMinSplitKeys, keys / wanted);
    int64_t slots_used = 0;
    for (size_t i = 0; i < tiles.size(); ++i) {
      Tile& tile = tiles[i];
      const int64_t ka = key_lo(tile.b, tile.s0), span = key_hi(tile.b, tile.s0 + tile.npos - 1) - ka;
      tile.pieces = std::max<int64_t>(1, (2 * span + piece_keys) / (2 * piece_keys));  // rounded
      tile.first_slot = slots_used;
      for (int64_t p = 0; p < tile.pieces; ++p)
        items.push_back({static_cast<int64_t>(i), ka + span * p / tile.pieces, ka + span * (p + 1) / tile.pieces,
                         slots_used++});
    }
    std::stable_sort(items.begin(), items.end(), [&tiles](const Item& x, const Item& y) {  // heaviest first
      return (x.kb - x.ka) * tiles[x.tile].npos > (y.kb - y.ka) * tiles[y.tile].npos;
    });
    grow(call->partial, slots_used * partial_stride());  // every item initializes its own slot
  }

  // The chunk of row b's keys that starts at n0 (at most kChunk, ending before kb and at the stage's end; the
  // token sinks' rows, once stage 0 has closed, end at sink_tokens).
  KeyChunk key_chunk(int64_t b, int64_t n0, int64_t kb) const {
    const int64_t first = past[b] / fmt.stage, open = first * fmt.stage;  // closed stages before this call
    if (n0 < fmt.sink_tokens && first > 0) {
      const half* rows = reinterpret_cast<const half*>(slot(b) + fmt.sink_rows_offset()) + n0 * W;
      return {nullptr, 0, 0, std::min({kChunk, fmt.sink_tokens - n0, kb - n0}), rows, rows + fmt.sink_tokens * W};
    }
    if (n0 < open) {
      const int64_t j = n0 / fmt.stage;
      const size_t stair = j < fmt.sink ? 0 : fmt.stair_of_age(first - 1 - j);
      const int64_t nk = std::min({kChunk, (j + 1) * fmt.stage - n0, kb - n0});
      return {record(b, stair, j), fmt.bits[stair], n0 - j * fmt.stage, nk, nullptr, nullptr};
    }
    if (n0 < past[b]) {
      const half* tail = reinterpret_cast<const half*>(slot(b)) + (n0 - open) * W;
      return {nullptr, 0, 0, std::min({kChunk, past[b] - n0, kb - n0}), tail, tail + fmt.stage * W};
    }
    const int64_t t = (b * S + n0 - past[b]) * W;
    return {nullptr, 0, 0, std::min(kChunk, kb - n0), k16 + t, v16 + t};
  }

  // The chunk's K (which = 0) or V (1) rows of head h as fp32 [nk, D] in out.
  void load_rows(const KeyChunk& c, int which, int64_t h, AttendScratch& sc, float* out) const {
    const int64_t c0 = h * D;
    if (c.record == nullptr) {
      const half* rows = (which ? c.v_rows : c.k_rows) + c0;
      for (int64_t i = 0; i < c.nk; ++i) widen(rows + i * W, out + i * D, D);
    } else if (which == 0) {
      float* lo = grow(sc.lo, D);
      float* scale_ = grow(sc.scale, D);
      widen(half_field(c.record, fmt.k_lo()) + c0, lo, D);
      widen(half_field(c.record, fmt.k_scale()) + c0, scale_, D);
      const int64_t row = fmt.code_row(c.bits);
      const uint8_t* codes = c.record + fmt.k_codes() + c.t0 * row;
      if (c.bits == 8) dequantize_k<8>(codes, row, c.nk, c0, D, lo, scale_, out);
      else if (c.bits == 4) dequantize_k<4>(codes, row, c.nk, c0, D, lo, scale_, out);
      else dequantize_k<2>(codes, row, c.nk, c0, D, lo, scale_, out);
    } else {
      const int64_t row = fmt.code_row(c.bits), groups = fmt.groups;
      const uint8_t* codes = c.record + fmt.v_codes(c.bits) + c.t0 * row;
      const half* lo = half_field(c.record, fmt.v_lo()) + c.t0 * groups;
      const half* scale_ = half_field(c.record, fmt.v_scale()) + c.t0 * groups;
      if (c.bits == 8) dequantize_v<8>(codes, row, lo, scale_, groups, fmt.v_group, c.nk, c0, D, out);
      else if (c.bits == 4) dequantize_v<4>(codes, row, lo, scale_, groups, fmt.v_group, c.nk, c0, D, out);
      else dequantize_v<2>(codes, row, lo, scale_, groups, fmt.v_group, c.nk, c0, D, out);
    }
  }

  // ---- step 2: one item. Rows of the tile are ordered (KV head, position, group head): head h's Rh = npos * G
  // rows are contiguous, as the P V micro-kernel wants them.
  void run_item(int64_t index) const {
    const Item& item = call->items[index];
    const Tile& tile = call->tiles[item.tile];
    const int64_t b = tile.b, npos = tile.npos, Rh = npos * G, rows = Rh * Hkv;
    float* O = call->partial.data() + item.slot * partial_stride();
    float* m = O + tile_rows() * D;
    float* l = m + tile_rows();
    std::fill(O, O + rows * D, 0.0f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.0f);
    AttendScratch& sc = attend_scratch();
    float* qs = grow(sc.qs, rows * D);  // pre-scaled queries
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t r = 0; r < Rh; ++r) {
        const T* src = q + ((b * S + tile.s0 + r / G) * Hq + h * G + r % G) * D;
        for (int64_t d = 0; d < D; ++d) qs[(h * Rh + r) * D + d] = to_f32(src[d]) * scale;
      }
    float* p = grow(sc.p, Rh * kChunk);  // scores, then probabilities, of one head's rows: [Rh, kChunk]
    float* kbuf = grow(sc.k, kChunk * D);
    float* vbuf = grow(sc.v, kChunk * D);
    const float* krows[kChunk];
    const float* vrows[kChunk];
    int64_t vis_lo[kRowsPerTile], vis_hi[kRowsPerTile];  // per position: the chunk's visible keys
    const int pv_heads = heads_per_call(Rh);
    for (int64_t n0 = item.ka, nk = 0; n0 < item.kb; n0 += nk) {
      const KeyChunk chunk = key_chunk(b, n0, item.kb);
      nk = chunk.nk;
      bool any = false;
      for (int64_t s = 0; s < npos; ++s) {
        vis_lo[s] = std::clamp<int64_t>(key_lo(b, tile.s0 + s) - n0, 0, nk);
        vis_hi[s] = std::clamp<int64_t>(key_hi(b, tile.s0 + s) - n0, vis_lo[s], nk);
        any |= vis_lo[s] < vis_hi[s];
      }
      if (!any) continue;
      for (int64_t i = 0; i < round_up(nk, kVec); ++i) {  // past nk: the last row again (scores unused)
        krows[i] = kbuf + std::min(i, nk - 1) * D;
        vrows[i] = vbuf + std::min(i, nk - 1) * D;
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        load_rows(chunk, 0, h, sc, kbuf);
        for (int64_t r = 0; r < Rh; ++r) {
          const int64_t a = vis_lo[r / G], e = vis_hi[r / G], row = h * Rh + r;
          float* pr = p + r * kChunk;
          if (a == e) {
            std::fill(pr, pr + nk, 0.0f);
            continue;
          }
          for (int64_t i = 0; i < nk; i += kVec) dots(qs + row * D, D, krows + i, pr + i);
          softmax_step(pr, nk, a, e, m[row], l[row], O + row * D);
        }
        if (chunk.record != nullptr && values_from_codes) {
          add_values_from_codes(chunk, h, Rh, pv_heads, p, sc, O + h * Rh * D);
          continue;
        }
        load_rows(chunk, 1, h, sc, vbuf);
        group_times_rows(pv_heads, Rh, p, kChunk, vrows, D, nk, O + h * Rh * D);
      }
    }
  }

  // O [Rh, D] += P V for the rows of head h over a closed stage's chunk, read from V's codes: per V group g in the
  // head, value = lo[t, g] + code * scale[t, g], so P V = (P scale_g) codes + (P lo_g) (the second a constant
  // per row over the group's channels). Needs groups of whole vectors (values_from_codes).
  void add_values_from_codes(const KeyChunk& c, int64_t h, int64_t Rh, int pv_heads, const float* p,
                             AttendScratch& sc, float* O) const {
    const int64_t row = fmt.code_row(c.bits), groups = fmt.groups, c0 = h * D;
    const uint8_t* codes = c.record + fmt.v_codes(c.bits) + c.t0 * row;
    const half* lo = half_field(c.record, fmt.v_lo()) + c.t0 * groups;
    const half* scale_ = half_field(c.record, fmt.v_scale()) + c.t0 * groups;
    float* ps = grow(sc.ps, Rh * kChunk);
    float* token_lo = grow(sc.token_lo, c.nk);
    float* token_scale = grow(sc.token_scale, c.nk);
    for (int64_t a = c0, e; a < c0 + D; a = e) {
      const int64_t g = a / fmt.v_group;
      e = std::min(c0 + D, (g + 1) * fmt.v_group);
      for (int64_t t = 0; t < c.nk; ++t) {
        token_lo[t] = to_f32(lo[t * groups + g]);
        token_scale[t] = to_f32(scale_[t * groups + g]);
      }
      for (int64_t r = 0; r < Rh; ++r) {
        const float* pr = p + r * kChunk;
        float* psr = ps + r * kChunk;
        float bias = 0.0f;
        for (int64_t t = 0; t < c.nk; ++t) bias += pr[t] * token_lo[t], psr[t] = pr[t] * token_scale[t];
        for (int64_t d = a - c0; d < e - c0; ++d) O[r * D + d] += bias;
      }
      float* out = O + (a - c0);
      if (c.bits == 8) rows_times_codes<8>(pv_heads, Rh, ps, kChunk, codes, row, a, e - a, c.nk, out, D);
      else if (c.bits == 4) rows_times_codes<4>(pv_heads, Rh, ps, kChunk, codes, row, a, e - a, c.nk, out, D);
      else rows_times_codes<2>(pv_heads, Rh, ps, kChunk, codes, row, a, e - a, c.nk, out, D);
    }
  }

  // Online softmax of one row over the chunk's scores pr[0 : nk], of which [a, e) are visible (a < e). Leaves
  // the probabilities in pr (0 outside [a, e)) and rescales the row's O, m, l.
  void softmax_step(float* pr, int64_t nk, int64_t a, int64_t e, float& m, float& l, float* O) const {
    const float m_new = max_of(pr + a, e - a, m);  // finite: a visible key
    const float alpha = exp_approx(m - m_new);
    std::fill(pr, pr + a, 0.0f);
    std::fill(pr + e, pr + nk, 0.0f);
    for (int64_t i = a; i < e; ++i) pr[i] -= m_new;
    exp_inplace(pr + a, e - a);
    l = l * alpha + sum_of(pr + a, e - a);
    if (m_new > m)
      for (int64_t d = 0; d < D; ++d) O[d] *= alpha;
    m = m_new;
  }

  // ---- step 3: merge each tile's pieces into its output rows.
  void combine() const {
    const int64_t stride = partial_stride();
    float* acc = grow(attend_scratch().acc, D);
    for (const Tile& tile : call->tiles) {
      const int64_t Rh = tile.npos * G;
      const float* first = call->partial.data() + tile.first_slot * stride;
      for (int64_t row = 0; row < Rh * Hkv; ++row) {
        const int64_t h = row / Rh, r = row % Rh;
        const float* O = first + row * D;
        const float* m = first + tile_rows() * D + row;
        const float* l = m + tile_rows();
        float m_max = kNegInf, l_sum = 0.0f;
        for (int64_t s = 0; s < tile.pieces; ++s) m_max = std::max(m_max, m[s * stride]);
        std::fill(acc, acc + D, 0.0f);
        for (int64_t s = 0; s < tile.pieces && m_max != kNegInf; ++s) {
          const float w = exp_approx(m[s * stride] - m_max);
          l_sum += w * l[s * stride];
          for (int64_t d = 0; d < D; ++d) acc[d] += w * O[s * stride + d];
        }
        const float inv = l_sum > 0.0f ? 1.0f / l_sum : 0.0f;
        T* out = o + ((tile.b * S + tile.s0 + r / G) * Hq + h * G + r % G) * D;
        for (int64_t d = 0; d < D; ++d) out[d] = from_f32<T>(acc[d] * inv);
      }
    }
  }

  // ---- step 4: the write of row b (after every item has read the cache as it was).
  void write_row(int64_t b) const {
    if (total[b] == past[b]) return;
    WriteScratch& sc = write_scratch();
    const int64_t stage = fmt.stage, first = past[b] / stage, closed = total[b] / stage;
    half* tail = reinterpret_cast<half*>(slot(b));  // the open stage's K rows, then its V rows
    float* run_k = grow(sc.k, stage * W);
    float* run_v = grow(sc.v, stage * W);
    for (int64_t j = first; j < closed; ++j) {
      for (int64_t r = 0; r < stage; ++r) {
        const int64_t position = j * stage + r;  // < past: a row of the open stage (j == first)
        if (position < past[b]) {
          widen(tail + r * W, run_k + r * W, W);
          widen(tail + stage * W + r * W, run_v + r * W, W);
        } else {
          widen(k16 + (b * S + position - past[b]) * W, run_k + r * W, W);
          widen(v16 + (b * S + position - past[b]) * W, run_v + r * W, W);
        }
      }
      close(b, j, run_k, run_v, sc);
    }
    const int64_t rest = std::max<int64_t>(past[b], closed * stage);  // the first new token left in the tail
    const int64_t r = rest - closed * stage, t = (b * S + rest - past[b]) * W;
    const size_t bytes = static_cast<size_t>((total[b] - rest) * W) * sizeof(half);
    std::memcpy(tail + r * W, k16 + t, bytes);
    std::memcpy(tail + (stage + r) * W, v16 + t, bytes);
  }

  // Logical stage j closes with K, V [stage, W] (kernels/kv_saq.py, _SlotView.close): the stages leaving a stair
  // move one down, bottom-most first (so each ring entry is free before it is written), re-quantized from their
  // dequantized values (equal widths: the bytes copied); sink stages stay. Then j takes the top stair. Stage 0's
  // first sink_tokens rows go to the slot's sink rows, and row sink_tokens takes their place in k_stage and
  // v_stage (sink_stand_in) before they are quantized.
  void close(int64_t b, int64_t j, float* k_stage, float* v_stage, WriteScratch& sc) const {
    for (size_t i = fmt.top(); i-- > 0;) {
      const int64_t leaving = j - fmt.first_age[i] - fmt.stages[i];  // its age becomes first_age[i + 1]
      if (leaving < fmt.sink) continue;  // none yet, or a sink stage
      const uint8_t* src = record(b, i, leaving);
      uint8_t* dst = record(b, i + 1, leaving);
      if (fmt.bits[i] == fmt.bits[i + 1]) {
        std::memcpy(dst, src, fmt.record_bytes(fmt.bits[i]));
        continue;
      }
      float* old_k = grow(sc.old_k, fmt.stage * W);
      float* old_v = grow(sc.old_v, fmt.stage * W);
      decode_record(fmt, src, fmt.bits[i], old_k, old_v);
      encode_record(fmt, old_k, old_v, fmt.bits[i + 1], dst, sc);
    }
    if (j == 0 && fmt.sink_tokens > 0) {
      half* sink_k = reinterpret_cast<half*>(slot(b) + fmt.sink_rows_offset());
      half* sink_v = sink_k + fmt.sink_tokens * W;
      for (int64_t i = 0; i < fmt.sink_tokens * W; ++i)  // exact: the rows hold fp16 values
        sink_k[i] = from_f32<half>(k_stage[i]), sink_v[i] = from_f32<half>(v_stage[i]);
      for (int64_t r = 0; r < fmt.sink_tokens; ++r) {
        std::copy_n(k_stage + fmt.sink_tokens * W, W, k_stage + r * W);
        std::copy_n(v_stage + fmt.sink_tokens * W, W, v_stage + r * W);
      }
    }
    encode_record(fmt, k_stage, v_stage, fmt.bits[0], record(b, 0, j), sc);
  }

  void write(OrtKernelContext* context) const {
    int64_t closes = 0;
    for (int64_t b = 0; b < B; ++b) closes += total[b] / fmt.stage - past[b] / fmt.stage;
    parallel_for(context, B, closes > 1, [this](int64_t b) { write_row(b); });
  }
};

// ------------------------------------------------------------------------------------------------ validation

constexpr size_t kInputs = 10, kOutputs = 3;
const char* const kInputNames[kInputs] = {"q", "k", "v", "kv_pool", "kv_slots", "block_table", "slot_mapping",
                                          "past_lens", "total_lens", "seq_slots"};

template <typename T>
std::string check_shapes(const Attributes& a, const Shapes& s, Job<T>& job) {
  static const size_t ranks[kInputs] = {3, 3, 3, 2, 2, 2, 2, 1, 1, 1};
  for (size_t i = 0; i < kInputs; ++i)
    if (s[i].size() != ranks[i])
      return message(kInputNames[i], " must have rank ", ranks[i], ", got shape ", shape_str(s[i]));
  job.B = s[0][0], job.S = s[0][1], job.Hq = a.num_heads, job.Hkv = a.num_kv_heads, job.G = job.Hq / job.Hkv;
  if (s[0][2] % job.Hq != 0 || s[0][2] == 0)
    return message("q width ", s[0][2], " is not a positive multiple of num_heads=", job.Hq);
  job.D = s[0][2] / job.Hq;
  job.W = job.Hkv * job.D;
  for (size_t i : {1, 2})
    if (s[i] != std::vector<int64_t>{job.B, job.S, job.W})
      return message(kInputNames[i], " shape ", shape_str(s[i]), " != [B, S, num_kv_heads * head_dim] = ",
                     shape_str({job.B, job.S, job.W}));
  if (std::string err = check_width(job.fmt, job.W); !err.empty()) return err;
  job.fmt.set_width(job.W);
  const SaqFormat& f = job.fmt;
  if (s[3][1] != f.block_bytes())
    return message("kv_pool shape ", shape_str(s[3]), ": blocks of ", s[3][1], " bytes, but the SAQ format '", f.spec,
                   "' over W = num_kv_heads * head_dim = ", job.W, " channels needs block_bytes = ", f.block_bytes());
  if (s[4][1] != f.slot_bytes())
    return message("kv_slots shape ", shape_str(s[4]), ": slots of ", s[4][1], " bytes, but the SAQ format '", f.spec,
                   "' over W = num_kv_heads * head_dim = ", job.W, " channels needs slot_bytes = ", f.slot_bytes());
  job.NB = s[3][0], job.NSL = s[4][0], job.MB = s[5][1];
  if (s[5][0] != job.B)
    return message("block_table shape ", shape_str(s[5]), " has ", s[5][0], " rows, q has B=", job.B);
  if (s[6] != std::vector<int64_t>{job.B, job.S})
    return message("slot_mapping shape ", shape_str(s[6]), " != [B, S] = ", shape_str({job.B, job.S}));
  for (size_t i : {7, 8, 9})
    if (s[i][0] != job.B) return message(kInputNames[i], " shape ", shape_str(s[i]), " != [B] = [", job.B, "]");
  return {};
}

// The index inputs' values: every record and slot a row touches must be inside its pool.
template <typename T>
std::string check_indices(const Job<T>& job) {
  const SaqFormat& f = job.fmt;
  for (int64_t b = 0; b < job.B; ++b) {
    const int64_t past = job.past[b], total = job.total[b], slot = job.seq_slots[b];
    if (past < 0) return message("past_lens[", b, "] = ", past, " is negative");
    if (total < past || total > past + job.S)
      return message("total_lens[", b, "] = ", total, " is not past_lens + new tokens: it must lie in [", past, ", ",
                     past + job.S, "] (past_lens[", b, "] = ", past, ", S = ", job.S, ")");
    if (slot < 0 || slot >= job.NSL)
      return message("seq_slots[", b, "] = ", slot, " is out of range [0, ", job.NSL, ") (kv_slots rows)");
    for (int64_t other = 0; other < b && total > past; ++other)
      if (job.seq_slots[other] == slot && job.total[other] > job.past[other])
        return message("seq_slots[", b, "] = ", slot, " is also row ", other, "'s slot: rows with new tokens need "
                       "slots of their own");
    // Logical stages [sink, paged) live on the bottom stair once this call has written (a superset of before).
    const int64_t paged = total / f.stage - f.first_age[f.top()];
    if (paged > f.sink && paged > job.MB)
      return message("block_table too narrow: total_lens[", b, "] = ", total, " puts stage ", paged - 1,
                     " on the bottom stair (block_table column ", paged - 1, "), block_table has ", job.MB,
                     " columns");
    for (int64_t j = f.sink; j < paged; ++j) {
      const int64_t block = job.block_table[b * job.MB + j];
      if (block < 0 || block >= job.NB)
        return message("block_table[", b, ", ", j, "] = ", block, " is out of range [0, ", job.NB,
                       ") (kv_pool blocks)");
    }
  }
  return {};
}

// ------------------------------------------------------------------------------------------------ ORT glue

constexpr char kOpName[] = "FlashAttentionSaq";

OrtStatusPtr saq_error(OrtErrorCode code, const std::string& what) { return op_error(kOpName, code, what); }

template <typename T>
struct SaqKernel {
  Attributes attrs;
  SaqFormat fmt;  // parsed once; its layout is set per call (the width comes from q)

  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) const noexcept {
    return compute_status(kOpName, [&] { return Compute(raw_context); });
  }

  OrtStatusPtr Compute(OrtKernelContext* raw_context) const {
    Ort::KernelContext context(raw_context);
    Shapes shapes(kInputs);
    for (size_t i = 0; i < kInputs; ++i) shapes[i] = context.GetInput(i).GetTensorTypeAndShapeInfo().GetShape();
    Job<T> job;
    job.fmt = fmt;
    if (std::string err = check_shapes(attrs, shapes, job); !err.empty()) return saq_error(ORT_INVALID_ARGUMENT, err);
    job.block_table = context.GetInput(5).GetTensorData<int32_t>();
    job.past = context.GetInput(7).GetTensorData<int32_t>();
    job.total = context.GetInput(8).GetTensorData<int32_t>();
    job.seq_slots = context.GetInput(9).GetTensorData<int32_t>();
    if (std::string err = check_indices(job); !err.empty()) return saq_error(ORT_INVALID_ARGUMENT, err);

    auto o = context.GetOutput(0, shapes[0]);
    job.pool = pool_output<uint8_t>(context, 1, 3, shapes, static_cast<size_t>(job.NB * job.fmt.block_bytes()));
    job.slots = pool_output<uint8_t>(context, 2, 4, shapes, static_cast<size_t>(job.NSL * job.fmt.slot_bytes()));
    if (job.B * job.S == 0) return nullptr;
    job.q = context.GetInput(0).GetTensorData<T>();
    job.k = context.GetInput(1).GetTensorData<T>();
    job.v = context.GetInput(2).GetTensorData<T>();
    job.o = o.GetTensorMutableData<T>();
    job.scale = attrs.scale;
    job.causal = attrs.causal != 0;
    job.window = attrs.sliding_window;
    job.call = &call_scratch();
    job.round_new_tokens();
    job.plan();
    run_items(raw_context, job);
    job.combine();
    job.write(raw_context);
    return nullptr;
  }
};

template <typename T>
struct SaqOp : Ort::CustomOpBase<SaqOp<T>, SaqKernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const noexcept {
    const char* required = "num_heads, num_kv_heads, scale, causal, sliding_window, kv_format, saq";
    return create_status(kOpName, required, [&]() -> OrtStatusPtr {
      Ort::ConstKernelInfo ki(info);
      auto created = std::make_unique<SaqKernel<T>>();
      created->attrs = read_attributes(ki);
      const Attributes& a = created->attrs;
      const std::string spec = ki.GetAttribute<std::string>("saq");
      if (std::string err = check_head_attributes(a); !err.empty()) return saq_error(ORT_INVALID_ARGUMENT, err);
      if (a.kv_format != "saq")
        return saq_error(ORT_INVALID_ARGUMENT, message("kv_format '", a.kv_format, "': FlashAttentionSaq runs the "
                                                       "SAQ staircase only (kv_format must be 'saq')"));
      if (std::string err = parse_format(spec, created->fmt); !err.empty())
        return saq_error(ORT_INVALID_ARGUMENT, message("saq attribute '", spec, "': ", err));
      if (ki.GetInputCount() != kInputs || ki.GetOutputCount() != kOutputs)
        return saq_error(ORT_INVALID_ARGUMENT, message("the node takes 10 inputs (q, k, v, kv_pool, kv_slots, "
                         "block_table, slot_mapping, past_lens, total_lens, seq_slots) and 3 outputs (o, kv_pool_out, "
                         "kv_slots_out), got ", ki.GetInputCount(), " and ", ki.GetOutputCount()));
      *kernel = created.release();
      return nullptr;
    });
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 0: case 1: case 2: return onnx_type<T>();
      case 3: case 4: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 6: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    }
  }
  size_t GetOutputTypeCount() const { return kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? onnx_type<T>() : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
};

}  // namespace

// fp32 and fp16 activations (the pools are bytes either way).
void add_saq_ops(Ort::CustomOpDomain& domain) {
  static SaqOp<float> op_fp32;
  static SaqOp<half> op_fp16;
  domain.Add(&op_fp32);
  domain.Add(&op_fp16);
}

}  // namespace fastattention
