// Native CPU kernel of the ONNX custom op fastattention::FlashAttention (domain "fastattention", version 1).
//
// Contract: kernels/reference.py, paged_attention_ref. This kernel must match it; the comparison is
// tests/kernels/test_attention_cpu.py, run on random inputs.
//   inputs   q [B, S, Hq*D], k [B, S, Hkv*D], v [B, S, Hkv*D]                    T
//            k_cache, v_cache [num_blocks NB, block_size BS, Hkv*D]             T (the paged pool of all rows)
//            block_table [B, MB] int32, slot_mapping [B, S] int64, past_lens [B] int32, total_lens [B] int32
//   outputs  o [B, S, Hq*D] T, k_cache_out and v_cache_out (the updated pools, with the input pools' shapes)
//   attrs    num_heads, num_kv_heads, scale, causal, sliding_window (0 = none), kv_format ("fp32" | "fp16")
//   T is float32, or float16 (stored as fp16, accumulated in fp32). kv_format must name the pool dtype.
// Masking is bottom-right aligned. Query s of row b sits at position past_lens[b] + s. It sees key j when
//   j < total_lens[b]; and, if causal, j <= past_lens[b] + s; and, with a window W > 0, past_lens[b] + s - j < W.
// A query that sees no key outputs zeros. Padding queries (past_lens[b] + s >= total_lens[b]) output zeros
// too: the contract lets them hold any finite value, and skipping them saves the work.
// In place: the runtime binds each pool as both input and output (IO binding). If ORT hands us the input
// buffer as the output, we write into it. Otherwise we first copy the input pool to the output.
//
// The file reads top to bottom:
//   numerics -> micro-kernels -> the attention job (cache update, decode kernel, tiled prefill kernel,
//   split-KV combine) -> validation -> ORT glue (kernel, op, RegisterCustomOps).
//
// Speed. The inner loops are written on GCC/Clang vector types (see "micro-kernels"). They are portable
// C++ for g++ and clang on x86-64 and aarch64, and need no intrinsics. Work items are (query tile, row,
// KV head, key split). They run on ORT's intra-op thread pool through KernelContext_ParallelFor, or
// serially when the call is too small to pay for waking the pool.
//   - Decode (one query per row): all the query heads of a KV head's group are computed together, so each
//     K and V row is read from the pool once. The next chunk's rows are prefetched, because the paged and
//     head-strided rows defeat the hardware prefetchers. Short batches split the keys into chunks and
//     merge the partial softmaxes afterwards (flash-decoding), so every thread gets work.
//   - Prefill: FlashAttention-2 tiles. A tile holds up to 64 query rows (positions x group heads) and
//     loops over 64-key tiles with an online softmax. It visits only the keys that some row of the tile
//     can see (tiles above the causal diagonal or before the window are skipped), and it masks only the
//     tiles on the diagonal or the window's edge.
//   Tile sizes were picked on a 2-vCPU AMD EPYC VM (AVX-512), 2026-11. To re-tune, change kRowsPerTile,
//   kKeyTile, kDecodeChunk and the micro-kernel shapes, then rerun `python -m benchmarks.attention_cpu`.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// ------------------------------------------------------------------------------------------------ numerics

// fp16 storage type: a native one where the compiler has it (conversions then use F16C on x86-64, FCVT
// on aarch64), else a struct converted by ORT's bit-exact helpers.
#if defined(__ARM_FP16_FORMAT_IEEE)
#define FASTATTENTION_NATIVE_HALF 1
using half = __fp16;  // aarch64 (ACLE)
#elif defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__i386__))
#define FASTATTENTION_NATIVE_HALF 1
using half = _Float16;  // g++ >= 12, clang >= 15
#endif

#if defined(FASTATTENTION_NATIVE_HALF)
inline float to_f32(half x) { return static_cast<float>(x); }
template <typename T>
inline T from_f32(float x) { return static_cast<T>(x); }
#else
struct half {
  uint16_t bits;
};
inline float to_f32(half x) { return Ort::Float16_t::FromBits(x.bits).ToFloat(); }
template <typename T>
inline T from_f32(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return half{Ort::Float16_t(x).val};
}
#endif
inline float to_f32(float x) { return x; }

template <typename T>
constexpr ONNXTensorElementDataType onnx_type() {
  return std::is_same_v<T, float> ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
template <typename T>
constexpr const char* kv_format_name() { return std::is_same_v<T, float> ? "fp32" : "fp16"; }

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) in float with the Cephes expf polynomial (about 1 ulp). Branch-free, so loops over it
// vectorize. x < -87 (including -inf) gives exactly 0.
inline float exp_approx(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds x * log2(e) to an integer
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

inline void exp_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_approx(x[i]);
}

// ------------------------------------------------------------------------------------------------ micro-kernels

// SIMD through GCC/Clang vector extensions: one source for AVX-512, AVX2, SSE2 and NEON. The compiler lowers
// a vector to the target's registers, or to scalars where there are none, so no per-ISA #ifdef is needed
// beyond picking the natural width. (g++ 12 does vectorize the same loops written on float arrays, but
// keeps the accumulators on the stack, which made the kernels 3-5x slower.)
#if defined(__AVX512F__)
constexpr int kVec = 16;
#elif defined(__AVX__)
constexpr int kVec = 8;
#else
constexpr int kVec = 4;
#endif
template <int N>
struct Lanes {
  typedef float type __attribute__((vector_size(N * sizeof(float))));
};
using vfloat = Lanes<kVec>::type;
constexpr int kPanel = 2 * kVec;  // columns per prefill micro-kernel call

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

template <int N>
inline float hsum(typename Lanes<N>::type v) {
  if constexpr (N == 2) {
    return v[0] + v[1];
  } else {
    typename Lanes<N / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return hsum<N / 2>(lo + hi);
  }
}

inline float max_of(const float* x, int64_t n, float init) {
  vfloat acc = vfloat{} + init;
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const vfloat v = vload(x + i);
    acc = v > acc ? v : acc;
  }
  float m = init;
  for (int j = 0; j < kVec; ++j) m = std::max(m, acc[j]);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

inline float sum_of(const float* x, int64_t n) {
  vfloat acc = {};
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) acc += vload(x + i);
  float s = hsum<kVec>(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

// Decode QK^T: out[g * stride + i] = dot(q[g], k_rows[i]) for NG query heads and KB keys at once.
template <int NG, int KB>
inline void group_dots(const float* q, int64_t D, const float* const* k_rows, float* out, int64_t stride) {
  vfloat acc[NG][KB] = {};
  int64_t d = 0;
  for (; d + kVec <= D; d += kVec) {
    vfloat kv[KB];
    for (int i = 0; i < KB; ++i) kv[i] = vload(k_rows[i] + d);
    for (int g = 0; g < NG; ++g) {
      const vfloat qv = vload(q + g * D + d);
      for (int i = 0; i < KB; ++i) acc[g][i] += qv * kv[i];
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < KB; ++i) {
      float s = hsum<kVec>(acc[g][i]);
      for (int64_t t = d; t < D; ++t) s += q[g * D + t] * k_rows[i][t];
      out[g * stride + i] = s;
    }
}

// Prefill S^T = K Q^T: c[r][0 : NP * kVec] = sum_d a_rows[r][d] * b[d * ldb + 0 : NP * kVec], MR key rows.
template <int MR, int NP>
inline void rows_times_panel(const float* const* a_rows, const float* b, int64_t ldb, int64_t K, float* c,
                             int64_t ldc) {
  vfloat acc[MR][NP] = {};
  for (int64_t d = 0; d < K; ++d) {
    vfloat bv[NP];
    for (int p = 0; p < NP; ++p) bv[p] = vload(b + d * ldb + p * kVec);
    for (int r = 0; r < MR; ++r) {
      const float a = a_rows[r][d];
      for (int p = 0; p < NP; ++p) acc[r][p] += a * bv[p];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) vstore(c + r * ldc + p * kVec, acc[r][p]);
}

// P V: c[r][col : col + NP * kVec] += sum_k a[r * a_rs + k * a_ks] * b_rows[k][col : ...], MR query rows.
template <int MR, int NP>
inline void strided_times_rows(const float* a, int64_t a_rs, int64_t a_ks, const float* const* b_rows, int64_t col,
                               int64_t K, float* c, int64_t ldc) {
  vfloat acc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = vload(c + r * ldc + p * kVec);
  for (int64_t k = 0; k < K; ++k) {
    vfloat bv[NP];
    for (int p = 0; p < NP; ++p) bv[p] = vload(b_rows[k] + col + p * kVec);
    for (int r = 0; r < MR; ++r) {
      const float ar = a[r * a_rs + k * a_ks];
      for (int p = 0; p < NP; ++p) acc[r][p] += ar * bv[p];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) vstore(c + r * ldc + p * kVec, acc[r][p]);
}

// c[MR rows][0 : D] += A (MR x K, strided) * B (K rows of D): panels of NP vectors, then one vector, then scalars.
template <int MR, int NP>
inline void times_rows(const float* a, int64_t a_rs, int64_t a_ks, const float* const* b_rows, int64_t D, int64_t K,
                       float* c, int64_t ldc) {
  int64_t col = 0;
  for (; col + NP * kVec <= D; col += NP * kVec) strided_times_rows<MR, NP>(a, a_rs, a_ks, b_rows, col, K, c + col, ldc);
  for (; col + kVec <= D; col += kVec) strided_times_rows<MR, 1>(a, a_rs, a_ks, b_rows, col, K, c + col, ldc);
  for (; col < D; ++col)
    for (int r = 0; r < MR; ++r) {
      float s = c[r * ldc + col];
      for (int64_t k = 0; k < K; ++k) s += a[r * a_rs + k * a_ks] * b_rows[k][col];
      c[r * ldc + col] = s;
    }
}

// The same for any row count: blocks of MR rows, then the remainder.
template <int MR, int NP>
inline void times_rows_any(int64_t rows, const float* a, int64_t a_rs, int64_t a_ks, const float* const* b_rows,
                           int64_t D, int64_t K, float* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) times_rows<MR, NP>(a + r * a_rs, a_rs, a_ks, b_rows, D, K, c + r * ldc, ldc);
  if constexpr (MR > 1) {
    if (r < rows) {
      // one call per remaining row keeps the dispatch simple; it runs on at most MR - 1 rows
      for (; r < rows; ++r) times_rows<1, NP>(a + r * a_rs, a_rs, a_ks, b_rows, D, K, c + r * ldc, ldc);
    }
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------------------------------------ the job

constexpr int64_t kRowsPerTile = 64;    // prefill: query rows (positions x group heads) per tile
constexpr int64_t kKeyTile = 64;        // prefill: keys per tile
constexpr int kKeyRows = 6;             // prefill: keys per QK^T micro-kernel call (6 x 2 vectors)
constexpr int kQueryRows = 6;           // prefill: query rows per PV micro-kernel call (6 x 2 vectors)
constexpr int64_t kDecodeChunk = 64;    // decode: keys per chunk of the online softmax
constexpr int kMaxDecodeGroup = 8;      // decode kernel for up to this many query heads per KV head
constexpr int64_t kMinItems = 16;       // split the keys of short batches until there are this many items
constexpr int64_t kMinSplitKeys = 256;  // ... but keep at least this many keys per split
constexpr int64_t kMinParallelFlops = int64_t{1} << 20;  // below this (~10-20 us) waking the pool costs more

// Per-thread buffers, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> qt, st, o, m, l, alpha, shift, rowsum, kbuf, vbuf, zero;
  std::vector<int64_t> lo, hi;
  std::vector<const float*> krows, vrows;
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

template <typename V>
typename V::value_type* grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline const float* as_f32(const float* row, float*, int64_t) { return row; }
inline const float* as_f32(const half* row, float* buf, int64_t D) {
  for (int64_t d = 0; d < D; ++d) buf[d] = to_f32(row[d]);
  return buf;
}

struct Sizes {
  int64_t B, S, Hq, Hkv, G, D, W, NB, BS, MB;
};

// One call of the op. T: q/k/v/o dtype. C: pool dtype.
template <typename T, typename C>
struct Job {
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
  T* o;
  // work decomposition
  int64_t q_tile = 1, num_q_tiles = 1, num_splits = 1, partial_rows = 0;
  int64_t flops = 0;  // upper bound of the FLOPs of QK^T and PV: decides whether to go parallel
  mutable std::vector<float> partial;  // per item (each writes its own slice): O [rows, D], m [rows], l [rows]

  int64_t real_len(int64_t b) const { return std::clamp<int64_t>(int64_t{total[b]} - past[b], 0, n.S); }
  int64_t key_lo(int64_t b, int64_t s) const {
    return window > 0 ? std::max<int64_t>(0, past[b] + s - window + 1) : 0;
  }
  int64_t key_hi(int64_t b, int64_t s) const {
    return causal ? std::min<int64_t>(total[b], past[b] + s + 1) : int64_t{total[b]};
  }
  int64_t num_items() const { return num_q_tiles * n.B * n.Hkv * num_splits; }
  int64_t partial_stride() const { return partial_rows * (n.D + 2); }

  // ---- step 1: write the new K/V rows into their slots (slots were validated).
  void write_new_kv() const {
    const int64_t tokens = n.B * n.S, W = n.W;
    for (int64_t t = 0; t < tokens; ++t) {
      C* kd = k_pool + slot_mapping[t] * W;
      C* vd = v_pool + slot_mapping[t] * W;
      if constexpr (std::is_same_v<T, C>) {
        std::memcpy(kd, k + t * W, W * sizeof(C));
        std::memcpy(vd, v + t * W, W * sizeof(C));
      } else {
        for (int64_t i = 0; i < W; ++i) kd[i] = from_f32<C>(to_f32(k[t * W + i]));
        for (int64_t i = 0; i < W; ++i) vd[i] = from_f32<C>(to_f32(v[t * W + i]));
      }
    }
  }

  // ---- step 2: split the work into items: (query tile, row, KV head, key split).
  void plan() {
    const bool decode = n.S == 1;
    q_tile = decode ? 1 : std::max<int64_t>(1, kRowsPerTile / n.G);
    num_q_tiles = (n.S + q_tile - 1) / q_tile;
    const int64_t base = num_q_tiles * n.B * n.Hkv;
    int64_t longest = 0;
    for (int64_t b = 0; b < n.B; ++b) {
      longest = std::max<int64_t>(longest, total[b]);
      flops += 4 * real_len(b) * total[b] * n.Hq * n.D;
    }
    num_splits = 1;
    if (base < kMinItems)
      num_splits = std::max<int64_t>(1, std::min((kMinItems + base - 1) / base, longest / kMinSplitKeys));
    if (num_splits > 1) {
      partial_rows = round_up(q_tile * n.G, kPanel);
      partial.assign(static_cast<size_t>(num_items() * partial_stride()), 0.0f);
    }
    // Padding queries output zeros; the items below skip them.
    for (int64_t b = 0; b < n.B; ++b)
      std::memset(o + (b * n.S + real_len(b)) * n.Hq * n.D, 0, (n.S - real_len(b)) * n.Hq * n.D * sizeof(T));
  }

  // ---- step 3: one work item. Items run heaviest first: late query tiles see the most keys.
  void run_item(int64_t item) const {
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
      O = partial.data() + item * partial_stride();
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
      if (npos == 1 && n.G <= kMaxDecodeGroup)
        attend_decode(b, h, s0, ka, kb, sc, O, m, l);
      else
        attend_tiled(b, h, s0, npos, ka, kb, sc, O, m, l);
    }
    if (num_splits == 1) write_output(b, h, s0, npos, O, l);
  }

  // Row pointers (head h) of keys [n0, n0 + nk) of row b, converted to fp32 if the pool is fp16.
  void gather(int64_t b, int64_t h, int64_t n0, int64_t nk, Scratch& sc, const float** krows,
              const float** vrows) const {
    const int32_t* table = block_table + b * n.MB;
    float* kbuf = grow(sc.kbuf, nk * n.D);
    float* vbuf = grow(sc.vbuf, nk * n.D);
    int64_t block = n0 / n.BS, offset = n0 % n.BS;
    for (int64_t i = 0; i < nk; ++i) {
      const int64_t row = (int64_t{table[block]} * n.BS + offset) * n.W + h * n.D;
      krows[i] = as_f32(k_pool + row, kbuf + i * n.D, n.D);
      vrows[i] = as_f32(v_pool + row, vbuf + i * n.D, n.D);
      if (++offset == n.BS) offset = 0, ++block;
    }
  }

  // Asks the memory system for the K and V rows (head h) of keys [n0, n0 + nk) of row b ahead of use: the
  // rows of one head are strided and jump between blocks, which the hardware prefetchers follow poorly.
  void prefetch(int64_t b, int64_t h, int64_t n0, int64_t nk) const {
    const int32_t* table = block_table + b * n.MB;
    int64_t block = n0 / n.BS, offset = n0 % n.BS;
    for (int64_t i = 0; i < nk; ++i) {
      const int64_t row = (int64_t{table[block]} * n.BS + offset) * n.W + h * n.D;
      for (int64_t byte = 0; byte < n.D * int64_t{sizeof(C)}; byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(k_pool + row) + byte);
        __builtin_prefetch(reinterpret_cast<const char*>(v_pool + row) + byte);
      }
      if (++offset == n.BS) offset = 0, ++block;
    }
  }

  // Decode: one query position, the G query heads of KV head h, every key of [ka, kb) visible.
  template <int NG>
  void attend_decode_group(int64_t b, int64_t h, int64_t s, int64_t ka, int64_t kb, Scratch& sc, float* O,
                           float* m, float* l) const {
    const int64_t D = n.D;
    float* qs = grow(sc.qt, NG * D);
    const T* qsrc = q + (b * n.S + s) * n.Hq * D + h * NG * D;
    for (int64_t i = 0; i < NG * D; ++i) qs[i] = to_f32(qsrc[i]) * scale;
    float p[NG][kDecodeChunk];
    const float** krows = grow(sc.krows, kDecodeChunk);
    const float** vrows = grow(sc.vrows, kDecodeChunk);
    for (int64_t n0 = ka; n0 < kb; n0 += kDecodeChunk) {
      const int64_t nk = std::min(kDecodeChunk, kb - n0);
      if (n0 + nk < kb) prefetch(b, h, n0 + nk, std::min(kDecodeChunk, kb - n0 - nk));
      gather(b, h, n0, nk, sc, krows, vrows);
      constexpr int KB = NG <= 3 ? 4 : (NG <= 6 ? 2 : 1);  // keys per call: about 12 accumulators
      int64_t key = 0;
      for (; key + KB <= nk; key += KB) group_dots<NG, KB>(qs, D, krows + key, &p[0][key], kDecodeChunk);
      for (; key < nk; ++key) group_dots<NG, 1>(qs, D, krows + key, &p[0][key], kDecodeChunk);
      for (int g = 0; g < NG; ++g) {
        const float m_new = max_of(p[g], nk, m[g]);
        const float alpha = exp_approx(m[g] - m_new);
        for (int64_t i = 0; i < nk; ++i) p[g][i] -= m_new;
        exp_inplace(p[g], nk);
        l[g] = l[g] * alpha + sum_of(p[g], nk);
        m[g] = m_new;
        for (int64_t d = 0; d < D; ++d) O[g * D + d] *= alpha;
      }
      constexpr int NP = NG <= 3 ? 4 : 12 / NG;  // vectors per row: about 12 accumulators
      times_rows<NG, NP>(&p[0][0], kDecodeChunk, 1, vrows, D, nk, O, D);
    }
  }

  void attend_decode(int64_t b, int64_t h, int64_t s, int64_t ka, int64_t kb, Scratch& sc, float* O, float* m,
                     float* l) const {
    switch (n.G) {
      case 1: return attend_decode_group<1>(b, h, s, ka, kb, sc, O, m, l);
      case 2: return attend_decode_group<2>(b, h, s, ka, kb, sc, O, m, l);
      case 3: return attend_decode_group<3>(b, h, s, ka, kb, sc, O, m, l);
      case 4: return attend_decode_group<4>(b, h, s, ka, kb, sc, O, m, l);
      case 5: return attend_decode_group<5>(b, h, s, ka, kb, sc, O, m, l);
      case 6: return attend_decode_group<6>(b, h, s, ka, kb, sc, O, m, l);
      case 7: return attend_decode_group<7>(b, h, s, ka, kb, sc, O, m, l);
      default: return attend_decode_group<8>(b, h, s, ka, kb, sc, O, m, l);
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

  void write_row(int64_t b, int64_t h, int64_t s0, int64_t j, const float* acc, float inv) const {
    T* out = o + (b * n.S + s0 + j / n.G) * n.Hq * n.D + (h * n.G + j % n.G) * n.D;
    for (int64_t d = 0; d < n.D; ++d) out[d] = from_f32<T>(acc[d] * inv);
  }

  void write_output(int64_t b, int64_t h, int64_t s0, int64_t npos, const float* O, const float* l) const {
    for (int64_t j = 0; j < npos * n.G; ++j) write_row(b, h, s0, j, O + j * n.D, l[j] > 0.0f ? 1.0f / l[j] : 0.0f);
  }

  // ---- step 4 (split keys only): merge the partial softmaxes of the splits of each (tile, row, head).
  void combine() const {
    std::vector<float> acc(n.D);
    const int64_t groups = num_items() / num_splits;
    for (int64_t group = 0; group < groups; ++group) {
      const int64_t h = group % n.Hkv, b = group / n.Hkv % n.B, qt = num_q_tiles - 1 - group / (n.Hkv * n.B);
      const int64_t s0 = qt * q_tile;
      const int64_t npos = std::max<int64_t>(0, std::min(s0 + q_tile, real_len(b)) - s0);
      const float* first = partial.data() + group * num_splits * partial_stride();
      for (int64_t j = 0; j < npos * n.G; ++j) {
        float m_max = kNegInf;
        for (int64_t s = 0; s < num_splits; ++s)
          m_max = std::max(m_max, first[s * partial_stride() + partial_rows * n.D + j]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        float l_sum = 0.0f;
        for (int64_t s = 0; s < num_splits && m_max != kNegInf; ++s) {
          const float* O = first + s * partial_stride();
          const float w = exp_approx(O[partial_rows * n.D + j] - m_max);
          l_sum += w * O[partial_rows * n.D + partial_rows + j];
          for (int64_t d = 0; d < n.D; ++d) acc[d] += w * O[j * n.D + d];
        }
        write_row(b, h, s0, j, acc.data(), l_sum > 0.0f ? 1.0f / l_sum : 0.0f);
      }
    }
  }
};

template <typename Job>
void run_item_entry(void* job, size_t item) {
  static_cast<const Job*>(job)->run_item(static_cast<int64_t>(item));
}

// Runs every item on ORT's intra-op pool. The fallback is a serial loop (no pool, or a minimal build).
template <typename Job>
void run_items(OrtKernelContext* context, const Job& job) {
  const size_t count = static_cast<size_t>(job.num_items());
  void* user = const_cast<Job*>(&job);
  if (count > 1 && job.flops >= kMinParallelFlops) {
    OrtStatus* status = Ort::GetApi().KernelContext_ParallelFor(context, &run_item_entry<Job>, count, 0, user);
    if (status == nullptr) return;
    Ort::GetApi().ReleaseStatus(status);
  }
  for (size_t i = 0; i < count; ++i) run_item_entry<Job>(user, i);
}

// ------------------------------------------------------------------------------------------------ validation

struct Attributes {
  int64_t num_heads = 0, num_kv_heads = 0, causal = 1, sliding_window = 0;
  float scale = 0.0f;
  std::string kv_format;
};

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

template <typename C>
std::string check_attributes(const Attributes& a) {
  if (a.num_heads <= 0) return message("num_heads must be > 0, got ", a.num_heads);
  if (a.num_kv_heads <= 0) return message("num_kv_heads must be > 0, got ", a.num_kv_heads);
  if (a.num_heads % a.num_kv_heads != 0)
    return message("num_heads=", a.num_heads, " is not a multiple of num_kv_heads=", a.num_kv_heads);
  if (a.causal != 0 && a.causal != 1) return message("causal must be 0 or 1, got ", a.causal);
  if (a.sliding_window < 0) return message("sliding_window must be >= 0 (0 = none), got ", a.sliding_window);
  if (!std::isfinite(a.scale)) return message("scale must be finite, got ", a.scale);
  if (a.kv_format != kv_format_name<C>())
    return message("kv_format '", a.kv_format, "' does not match the ", kv_format_name<C>(),
                   " KV cache (kv_format must be '", kv_format_name<C>(), "')");
  return {};
}

// Shapes of the nine inputs, in input order.
using Shapes = std::vector<std::vector<int64_t>>;

std::string check_shapes(const Attributes& a, const Shapes& s, Sizes& n) {
  static const char* names[] = {"q", "k", "v", "k_cache", "v_cache", "block_table", "slot_mapping", "past_lens",
                                "total_lens"};
  static const size_t ranks[] = {3, 3, 3, 3, 3, 2, 2, 1, 1};
  for (size_t i = 0; i < 9; ++i)
    if (s[i].size() != ranks[i])
      return message(names[i], " must have rank ", ranks[i], ", got shape ", shape_str(s[i]));
  n.B = s[0][0], n.S = s[0][1], n.Hq = a.num_heads, n.Hkv = a.num_kv_heads, n.G = n.Hq / n.Hkv;
  n.NB = s[3][0], n.BS = s[3][1], n.W = s[3][2], n.MB = s[5][1];
  if (n.BS <= 0) return message("k_cache block_size must be > 0, got shape ", shape_str(s[3]));
  if (s[0][2] % n.Hq != 0 || s[0][2] == 0)
    return message("q width ", s[0][2], " is not a positive multiple of num_heads=", n.Hq);
  n.D = s[0][2] / n.Hq;
  if (n.W != n.Hkv * n.D)
    return message("k_cache width ", n.W, " != num_kv_heads * head_dim = ", n.Hkv, " * ", n.D, " (head_dim from q)");
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

// ------------------------------------------------------------------------------------------------ ORT glue

OrtStatusPtr error_status(OrtErrorCode code, const std::string& what) {
  return Ort::Status(("FlashAttention: " + what).c_str(), code).release();
}

template <typename T, typename C>
struct FlashAttentionKernel {
  Attributes attrs;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) const noexcept {
    try {
      return Compute(raw_context);
    } catch (const Ort::Exception& e) {
      return error_status(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return error_status(ORT_RUNTIME_EXCEPTION, e.what());
    }
  }

  OrtStatusPtr Compute(OrtKernelContext* raw_context) const {
    Ort::KernelContext context(raw_context);
    Shapes shapes(9);
    for (size_t i = 0; i < 9; ++i) shapes[i] = context.GetInput(i).GetTensorTypeAndShapeInfo().GetShape();
    Job<T, C> job;
    if (std::string err = check_shapes(attrs, shapes, job.n); !err.empty())
      return error_status(ORT_INVALID_ARGUMENT, err);
    job.block_table = context.GetInput(5).GetTensorData<int32_t>();
    job.slot_mapping = context.GetInput(6).GetTensorData<int64_t>();
    job.past = context.GetInput(7).GetTensorData<int32_t>();
    job.total = context.GetInput(8).GetTensorData<int32_t>();
    if (std::string err = check_indices(job.n, job.block_table, job.slot_mapping, job.past, job.total); !err.empty())
      return error_status(ORT_INVALID_ARGUMENT, err);

    // Outputs. With IO binding of a pool as both input and output, ORT returns the input buffer here.
    auto o = context.GetOutput(0, shapes[0]);
    auto k_out = context.GetOutput(1, shapes[3]);
    auto v_out = context.GetOutput(2, shapes[4]);
    const size_t pool_bytes = static_cast<size_t>(job.n.NB * job.n.BS * job.n.W) * sizeof(C);
    if (pool_bytes == 0) return nullptr;  // then B * S == 0 too: a slot would have been out of range
    job.k_pool = k_out.GetTensorMutableData<C>();
    job.v_pool = v_out.GetTensorMutableData<C>();
    const C* k_in = context.GetInput(3).GetTensorData<C>();
    const C* v_in = context.GetInput(4).GetTensorData<C>();
    if (job.k_pool != k_in) std::memcpy(job.k_pool, k_in, pool_bytes);
    if (job.v_pool != v_in) std::memcpy(job.v_pool, v_in, pool_bytes);
    if (job.n.B * job.n.S == 0) return nullptr;

    job.q = context.GetInput(0).GetTensorData<T>();
    job.k = context.GetInput(1).GetTensorData<T>();
    job.v = context.GetInput(2).GetTensorData<T>();
    job.o = o.GetTensorMutableData<T>();
    job.scale = attrs.scale;
    job.causal = attrs.causal != 0;
    job.window = attrs.sliding_window;
    job.write_new_kv();
    job.plan();
    run_items(raw_context, job);
    if (job.num_splits > 1) job.combine();
    return nullptr;
  }
};

template <typename T, typename C>
struct FlashAttentionOp : Ort::CustomOpBase<FlashAttentionOp<T, C>, FlashAttentionKernel<T, C>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const noexcept {
    try {
      Ort::ConstKernelInfo ki(info);
      Attributes a;
      a.num_heads = ki.GetAttribute<int64_t>("num_heads");
      a.num_kv_heads = ki.GetAttribute<int64_t>("num_kv_heads");
      a.scale = ki.GetAttribute<float>("scale");
      a.causal = ki.GetAttribute<int64_t>("causal");
      a.sliding_window = ki.GetAttribute<int64_t>("sliding_window");
      a.kv_format = ki.GetAttribute<std::string>("kv_format");
      if (std::string err = check_attributes<C>(a); !err.empty()) return error_status(ORT_INVALID_ARGUMENT, err);
      *kernel = new FlashAttentionKernel<T, C>{a};
      return nullptr;
    } catch (const Ort::Exception& e) {
      return error_status(ORT_INVALID_ARGUMENT,
                          message(e.what(), " (attributes: num_heads, num_kv_heads, scale, causal, sliding_window, "
                                            "kv_format are all required)"));
    } catch (const std::exception& e) {
      return error_status(ORT_RUNTIME_EXCEPTION, e.what());
    }
  }

  const char* GetName() const { return "FlashAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 9; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 0: case 1: case 2: return onnx_type<T>();
      case 3: case 4: return onnx_type<C>();
      case 6: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    }
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t index) const { return index == 0 ? onnx_type<T>() : onnx_type<C>(); }
};

}  // namespace

// Called by SessionOptions.register_custom_ops_library. Registers fp32 and fp16 variants of one op name.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "fastattention: this library needs onnxruntime >= 1.29");
  Ort::InitApi(api);
  static FlashAttentionOp<float, float> op_fp32;
  static FlashAttentionOp<half, half> op_fp16;
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;  // must outlive every session that uses them
  try {
    Ort::CustomOpDomain domain{"fastattention"};
    domain.Add(&op_fp32);
    domain.Add(&op_fp16);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
