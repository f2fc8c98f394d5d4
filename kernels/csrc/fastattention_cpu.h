// Shared by the CPU kernels of the fastattention custom-op domain (one .so): fastattention_cpu.cc
// (FlashAttention over fp32/fp16/int8/int4 pools) and saq_cpu.cc (FlashAttentionSaq over the SAQ staircase).
//
// The header reads top to bottom: numerics (fp16 storage, exp) -> SIMD micro-kernels (GCC/Clang vector types;
// see fastattention_cpu.cc for how they are used and tuned) -> running work items on ORT's thread pool ->
// validation helpers -> the ORT glue (attributes, errors as statuses). Everything lives in namespace
// fastattention and is inline: each kernel file includes it once and keeps its own per-thread scratch.
#pragma once

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
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastattention {

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
inline float to_f32(int8_t x) { return static_cast<float>(x); }
static_assert(sizeof(half) == 2, "half must be 16-bit storage");

// dst[0 : n] = src[0 : n] widened to fp32: 16 (AVX-512) or 8 (F16C) at a time on x86-64, else one by one.
// (The maskz form with a full mask is plain vcvtph2ps; the unmasked one trips -Wmaybe-uninitialized in g++ 12.)
inline void widen(const half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_maskz_cvtph_ps(0xFFFF, h));
  }
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

template <typename T>
constexpr ONNXTensorElementDataType onnx_type() {
  if constexpr (std::is_same_v<T, float>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  else if constexpr (std::is_same_v<T, half>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  else if constexpr (std::is_same_v<T, int8_t>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  else return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}

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
constexpr int kAccumulators = 16;  // vector accumulators a micro-kernel may keep in registers (32 zmm)
#elif defined(__AVX__)
constexpr int kVec = 8;
constexpr int kAccumulators = 12;  // 16 ymm
#else
constexpr int kVec = 4;
constexpr int kAccumulators = 12;
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
// kVec fp16 values widened to fp32 (vcvtph2ps on x86-64), so fp16 KV rows feed the micro-kernels directly.
inline vfloat vload(const half* p) {
  vfloat v;
#if defined(__AVX512F__)
  const __m512 x = _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &x, sizeof v);
#elif defined(__F16C__) && defined(__AVX__)
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &x, sizeof v);
#else
  for (int i = 0; i < kVec; ++i) v[i] = to_f32(p[i]);
#endif
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// Quantized codes. kVec int8 codes widened to fp32 (vpmovsxbd + vcvtdq2ps on x86-64, sxtl + scvtf on aarch64).
typedef int8_t vbytes __attribute__((vector_size(kVec)));
typedef int32_t vint __attribute__((vector_size(kVec * sizeof(int32_t))));
// (g++ 12 lowers __builtin_convertvector from 16 bytes to scalar shifts and cvtsi2ss, ~4x slower than the
// fp16 path: measured on AVX-512, so x86-64 widens with intrinsics.)
inline vint widen_bytes(const int8_t* p) {
  vint x;
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&x, &w, sizeof x);
#elif defined(__AVX2__)
  const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&x, &w, sizeof x);
#else
  vbytes c;
  std::memcpy(&c, p, sizeof c);
  x = __builtin_convertvector(c, vint);
#endif
  return x;
}
inline vfloat to_vfloat(vint x) {
  vfloat v;
#if defined(__AVX512F__)
  __m512i w;
  std::memcpy(&w, &x, sizeof w);
  const __m512 f = _mm512_cvtepi32_ps(w);
  std::memcpy(&v, &f, sizeof v);
#elif defined(__AVX2__)
  __m256i w;
  std::memcpy(&w, &x, sizeof w);
  const __m256 f = _mm256_cvtepi32_ps(w);
  std::memcpy(&v, &f, sizeof v);
#else
  v = __builtin_convertvector(x, vfloat);
#endif
  return v;
}
inline vfloat vload(const int8_t* p) { return to_vfloat(widen_bytes(p)); }


// Horizontal reductions of one vector in log2(kVec) halving steps.
template <int N>
inline float hsum(typename Lanes<N>::type v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    typename Lanes<N / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return hsum<N / 2>(lo + hi);
  }
}
template <int N>
inline float hmax(typename Lanes<N>::type v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    typename Lanes<N / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return hmax<N / 2>(lo > hi ? lo : hi);
  }
}

inline float max_of(const float* x, int64_t n, float init) {
  vfloat acc = vfloat{} + init;
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const vfloat v = vload(x + i);
    acc = v > acc ? v : acc;
  }
  float m = hmax<kVec>(acc);
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

// Lane sums of kVec vectors at once: returns the vector whose lane i is the sum of the lanes of v[i]. Each
// level adds the two halves of every segment of two vectors, so kVec sums cost about 2 shuffles and one
// add per sum instead of a whole horizontal reduction each. Level `Seg`: v[0 : Seg] hold kVec / Seg
// segments of Seg lanes each; the output keeps the segments in order.
template <int Seg, size_t... I>
inline vfloat fold_pair(vfloat x, vfloat y, std::index_sequence<I...>) {
  constexpr int N = kVec, H = Seg / 2;
  // Output lane I reads x (I < N / 2) or y at segment j = t / H, offset r = t % H with t = I % (N / 2):
  // lane j * Seg + r (lo, the segment's first half) and lane j * Seg + H + r (hi, its second half).
  const vfloat lo =
      __builtin_shufflevector(x, y, ((I < N / 2 ? 0 : N) + (I % (N / 2)) / H * Seg + (I % (N / 2)) % H)...);
  const vfloat hi =
      __builtin_shufflevector(x, y, ((I < N / 2 ? 0 : N) + (I % (N / 2)) / H * Seg + H + (I % (N / 2)) % H)...);
  return lo + hi;
}
template <int Seg = kVec>
inline vfloat lane_sums(vfloat* v) {
  for (int i = 0; i < Seg / 2; ++i) v[i] = fold_pair<Seg>(v[2 * i], v[2 * i + 1], std::make_index_sequence<kVec>{});
  if constexpr (Seg > 2) return lane_sums<Seg / 2>(v);
  else return v[0];
}

// Decode QK^T: out[i] = dot(q, rows[i][0 : D]) for kVec key rows (fp32 or fp16). Key after key, with up to
// 4 vectors of q held in registers, so each key costs one row pointer and D / kVec loads and FMAs.
template <typename R>
inline void dots(const float* q, int64_t D, const R* const* rows, float* out) {
  vfloat acc[kVec] = {};
  int64_t d = 0;
  for (; d + 4 * kVec <= D; d += 4 * kVec) {
    const vfloat q0 = vload(q + d), q1 = vload(q + d + kVec);
    const vfloat q2 = vload(q + d + 2 * kVec), q3 = vload(q + d + 3 * kVec);
    for (int i = 0; i < kVec; ++i) {
      const R* r = rows[i] + d;
      acc[i] += q0 * vload(r);
      acc[i] += q1 * vload(r + kVec);
      acc[i] += q2 * vload(r + 2 * kVec);
      acc[i] += q3 * vload(r + 3 * kVec);
    }
  }
  for (; d + kVec <= D; d += kVec) {
    const vfloat qv = vload(q + d);
    for (int i = 0; i < kVec; ++i) acc[i] += qv * vload(rows[i] + d);
  }
  vstore(out, lane_sums(acc));
  for (; d < D; ++d)
    for (int i = 0; i < kVec; ++i) out[i] += q[d] * to_f32(rows[i][d]);
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
// b_rows are fp32, or fp16 (decode reads fp16 pools directly).
template <int MR, int NP, typename R>
inline void strided_times_rows(const float* a, int64_t a_rs, int64_t a_ks, const R* const* b_rows, int64_t col,
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
template <int MR, int NP, typename R>
inline void times_rows(const float* a, int64_t a_rs, int64_t a_ks, const R* const* b_rows, int64_t D, int64_t K,
                       float* c, int64_t ldc) {
  int64_t col = 0;
  for (; col + NP * kVec <= D; col += NP * kVec) strided_times_rows<MR, NP>(a, a_rs, a_ks, b_rows, col, K, c + col, ldc);
  for (; col + kVec <= D; col += kVec) strided_times_rows<MR, 1>(a, a_rs, a_ks, b_rows, col, K, c + col, ldc);
  for (; col < D; ++col)
    for (int r = 0; r < MR; ++r) {
      float s = c[r * ldc + col];
      for (int64_t k = 0; k < K; ++k) s += a[r * a_rs + k * a_ks] * to_f32(b_rows[k][col]);
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

// Decode P V for the G query heads of one KV head: O[g] += sum_k p[g * p_stride + k] * rows[k], in calls of
// NG heads (NG divides G) that keep NG x NP vectors of O in registers while the K value rows stream by.
template <int NG, typename R>
inline void heads_times_rows(int64_t G, const float* p, int64_t p_stride, const R* const* rows, int64_t D, int64_t K,
                             float* O) {
  constexpr int NP = std::max(1, std::min(4, kAccumulators / NG));
  for (int64_t g = 0; g < G; g += NG) times_rows<NG, NP>(p + g * p_stride, p_stride, 1, rows, D, K, O + g * D, D);
}

// The largest divisor of G that is at most 8: the heads per heads_times_rows call.
inline int heads_per_call(int64_t G) {
  for (int ng = 8; ng > 1; --ng)
    if (G % ng == 0) return ng;
  return 1;
}

template <typename R>
inline void group_times_rows(int ng, int64_t G, const float* p, int64_t p_stride, const R* const* rows, int64_t D,
                             int64_t K, float* O) {
  switch (ng) {
    case 8: return heads_times_rows<8>(G, p, p_stride, rows, D, K, O);
    case 7: return heads_times_rows<7>(G, p, p_stride, rows, D, K, O);
    case 6: return heads_times_rows<6>(G, p, p_stride, rows, D, K, O);
    case 5: return heads_times_rows<5>(G, p, p_stride, rows, D, K, O);
    case 4: return heads_times_rows<4>(G, p, p_stride, rows, D, K, O);
    case 3: return heads_times_rows<3>(G, p, p_stride, rows, D, K, O);
    case 2: return heads_times_rows<2>(G, p, p_stride, rows, D, K, O);
    default: return heads_times_rows<1>(G, p, p_stride, rows, D, K, O);
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ------------------------------------------------------------------------------------------------ work items

constexpr int64_t kMinParallelFlops = int64_t{1} << 20;  // below this (~10-20 us) waking the pool costs more

template <typename V>
typename V::value_type* grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline int64_t hardware_threads() {
  static const int64_t count = std::max(1u, std::thread::hardware_concurrency());
  return count;
}

template <typename Fn>
void parallel_entry(void* fn, size_t item) {
  (*static_cast<const Fn*>(fn))(static_cast<int64_t>(item));
}

// Runs fn(0) .. fn(count - 1) on ORT's intra-op pool when `parallel` (and count > 1), else (or if the pool is
// not there: a minimal build) in a serial loop.
template <typename Fn>
void parallel_for(OrtKernelContext* context, int64_t count, bool parallel, const Fn& fn) {
  if (parallel && count > 1) {
    void* user = const_cast<Fn*>(&fn);
    const size_t n = static_cast<size_t>(count);
    OrtStatus* status = Ort::GetApi().KernelContext_ParallelFor(context, &parallel_entry<Fn>, n, 0, user);
    if (status == nullptr) return;
    Ort::GetApi().ReleaseStatus(status);
  }
  for (int64_t i = 0; i < count; ++i) fn(i);
}

// Runs every item of a job (num_items(), run_item(i), flops) on the pool: in parallel once it is worth it.
template <typename Job>
void run_items(OrtKernelContext* context, const Job& job) {
  parallel_for(context, job.num_items(), job.flops >= kMinParallelFlops, [&job](int64_t i) { job.run_item(i); });
}

// ------------------------------------------------------------------------------------------------ validation

// The attributes every attention op of the domain has.
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

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// The checks of the attributes that do not depend on the KV format; "" when they pass.
inline std::string check_head_attributes(const Attributes& a) {
  if (a.num_heads <= 0) return message("num_heads must be > 0, got ", a.num_heads);
  if (a.num_kv_heads <= 0) return message("num_kv_heads must be > 0, got ", a.num_kv_heads);
  if (a.num_heads % a.num_kv_heads != 0)
    return message("num_heads=", a.num_heads, " is not a multiple of num_kv_heads=", a.num_kv_heads);
  if (a.causal != 0 && a.causal != 1) return message("causal must be 0 or 1, got ", a.causal);
  if (a.sliding_window < 0) return message("sliding_window must be >= 0 (0 = none), got ", a.sliding_window);
  if (!std::isfinite(a.scale)) return message("scale must be finite, got ", a.scale);
  return {};
}

// Shapes of a node's inputs, in input order.
using Shapes = std::vector<std::vector<int64_t>>;

// Output `out`, a pool updated in place: with IO binding of the pool as both input `in` and output, ORT hands
// us the input buffer; otherwise the input pool is copied to the output first.
template <typename P>
P* pool_output(Ort::KernelContext& context, size_t out, size_t in, const Shapes& shapes, size_t bytes) {
  P* pool = context.GetOutput(out, shapes[in]).GetTensorMutableData<P>();
  const P* source = context.GetInput(in).GetTensorData<P>();
  if (pool != source) std::memcpy(pool, source, bytes);
  return pool;
}

// ------------------------------------------------------------------------------------------------ ORT glue

// The attributes every attention op of the domain has, read from a node; throws Ort::Exception if one is missing.
inline Attributes read_attributes(const Ort::ConstKernelInfo& info) {
  Attributes a;
  a.num_heads = info.GetAttribute<int64_t>("num_heads");
  a.num_kv_heads = info.GetAttribute<int64_t>("num_kv_heads");
  a.scale = info.GetAttribute<float>("scale");
  a.causal = info.GetAttribute<int64_t>("causal");
  a.sliding_window = info.GetAttribute<int64_t>("sliding_window");
  a.kv_format = info.GetAttribute<std::string>("kv_format");
  return a;
}

// An error of op `op` (its name: "FlashAttention", "FlashAttentionSaq") as an ORT status: "<op>: <what>".
inline OrtStatusPtr op_error(const char* op, OrtErrorCode code, const std::string& what) {
  return Ort::Status((std::string(op) + ": " + what).c_str(), code).release();
}

// A kernel's ComputeV2: the status compute() returns, or its exception as an error of `op`.
template <typename Compute>
OrtStatusPtr compute_status(const char* op, const Compute& compute) noexcept {
  try {
    return compute();
  } catch (const Ort::Exception& e) {
    return op_error(op, e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return op_error(op, ORT_RUNTIME_EXCEPTION, e.what());
  }
}

// An op's CreateKernelV2: the status create() returns, or its exception as an error of `op`. An Ort::Exception
// is a missing attribute: INVALID_ARGUMENT, naming the op's `required` attributes.
template <typename Create>
OrtStatusPtr create_status(const char* op, const char* required, const Create& create) noexcept {
  try {
    return create();
  } catch (const Ort::Exception& e) {
    return op_error(op, ORT_INVALID_ARGUMENT, message(e.what(), " (attributes: ", required, " are all required)"));
  } catch (const std::exception& e) {
    return op_error(op, ORT_RUNTIME_EXCEPTION, e.what());
  }
}

// The FlashAttentionSaq op (saq_cpu.cc): RegisterCustomOps (fastattention_cpu.cc) adds it to the domain.
void add_saq_ops(Ort::CustomOpDomain& domain);

}  // namespace fastattention
