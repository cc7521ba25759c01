// Inner loops of the CPU ops over one contiguous run of elements ("segment").
//
// This file is included twice, inside namespace roga::cpu::base (compiled for the baseline
// x86-64/AArch64 ISA) and roga::cpu::avx2 (under #pragma GCC target("avx2,fma,f16c")),
// and the fastest table the CPU supports is chosen at load time. It includes nothing:
// every header it needs is included by the two translation units before the pragma.
//
// Storage types float16/bfloat16 are converted in blocks of kBlock (kernels.hpp) elements to float32
// buffers that stay in L1, so every loop below runs on plain float arrays and vectorizes;
// float32/float64 storage is used in place (no copy). Math is float32 (float64 for float64
// storage); reductions use float32 SIMD lanes within a block and a double across blocks.

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline void half_to_float(const uint16_t* s, float* d, int64_t n) {
  int64_t j = 0;
#ifdef ROGA_F16C
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(d + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j))));
#endif
  for (; j < n; ++j) d[j] = c10::detail::fp16_ieee_to_fp32_value(s[j]);
}

inline void float_to_half(const float* s, uint16_t* d, int64_t n) {
  int64_t j = 0;
#ifdef ROGA_F16C
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j), _mm256_cvtps_ph(_mm256_loadu_ps(s + j), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; j < n; ++j) d[j] = c10::detail::fp16_ieee_from_fp32_value(s[j]);
}

inline void bf16_to_float(const uint16_t* s, float* d, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) d[j] = bits_to_float(static_cast<uint32_t>(s[j]) << 16);
}

inline void float_to_bf16(const float* s, uint16_t* d, int64_t n) {
  // Round to nearest even, NaN to the canonical quiet NaN: the same bits as c10::BFloat16.
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = float_to_bits(s[j]);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    d[j] = s[j] != s[j] ? uint16_t(0x7FC0) : static_cast<uint16_t>(r);
  }
}

// IO<T>: how a block of storage type T becomes compute type C and back.
//   load(src, buf, n) -> pointer to n values of C (src itself when T == C)
//   dst_buf(dst, buf) -> where to compute an output block (dst itself when T == C)
//   store(dst, src, n)   writes n values back (nothing to do when src == dst)
template <typename T>
struct IO {  // float, double: no conversion
  using C = T;
  static const C* load(const T* s, C*, int64_t) { return s; }
  static C* dst_buf(T* d, C*) { return d; }
  static void store(T* d, const C* s, int64_t n) {
    if (d != s) std::memcpy(d, s, n * sizeof(T));
  }
};

template <>
struct IO<c10::Half> {
  using C = float;
  static const float* load(const c10::Half* s, float* buf, int64_t n) {
    half_to_float(reinterpret_cast<const uint16_t*>(s), buf, n);
    return buf;
  }
  static float* dst_buf(c10::Half*, float* buf) { return buf; }
  static void store(c10::Half* d, const float* s, int64_t n) { float_to_half(s, reinterpret_cast<uint16_t*>(d), n); }
};

template <>
struct IO<c10::BFloat16> {
  using C = float;
  static const float* load(const c10::BFloat16* s, float* buf, int64_t n) {
    bf16_to_float(reinterpret_cast<const uint16_t*>(s), buf, n);
    return buf;
  }
  static float* dst_buf(c10::BFloat16*, float* buf) { return buf; }
  static void store(c10::BFloat16* d, const float* s, int64_t n) { float_to_bf16(s, reinterpret_cast<uint16_t*>(d), n); }
};

#define ROGA_BLOCKS(n) \
  for (int64_t o = 0, m = std::min(kBlock, (n)); o < (n); o += kBlock, m = std::min(kBlock, (n) - o))

// The blocks of an elementwise kernel: elementwise_block elements on storage used in place,
// kBlock where 16-bit storage is converted (the buffers are kBlock long).
template <typename T>
inline int64_t elementwise_block_of() {
  if (!std::is_same<T, typename IO<T>::C>::value) return kBlock;
  return std::clamp<int64_t>(elementwise_block.load(std::memory_order_relaxed), 1, kBlock);
}
#define ROGA_EW_BLOCKS(T, n)                                                                     \
  for (int64_t bs_ = elementwise_block_of<T>(), o = 0, m = std::min(bs_, (n)); o < (n); o += bs_, \
               m = std::min(bs_, (n) - o))

// sum x^2, or with p: sum ((|p| + eta) x)^2 (the ASAM norm)
template <typename T>
double sumsq(const void* xv, const void* pv, int64_t n, double eta_d) {
  using C = typename IO<T>::C;
  const T* x = static_cast<const T*>(xv);
  const T* p = static_cast<const T*>(pv);
  const C eta = static_cast<C>(eta_d);
  alignas(64) C xb[kBlock], pb[kBlock];
  double total = 0;
  int64_t done = 0;
  if constexpr (std::is_same<T, C>::value) {
    if (!p) {
      // Windows of up to 64 whole blocks, block i read in one loop with block i + half: two
      // streams in flight, where one core reading one stream gets ~2/3 of the bandwidth.
      // Each block's float sum is the one the loop below computes (same lanes, same
      // order), and the sums are added to the total in block order: the same bits.
      constexpr int64_t kWindow = 64;
      C part[kWindow];
      while (n - done >= 2 * kBlock) {
        // an even number of whole blocks; a last odd one is left to the loop below
        const int64_t nb = std::min(kWindow, (n - done) / kBlock) & ~int64_t(1), half = nb / 2;
        for (int64_t i = 0; i < half; ++i) {
          const C* a = x + done + i * kBlock;
          const C* b = x + done + (i + half) * kBlock;
          C sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
          for (int64_t j = 0; j < kBlock; ++j) {
            sa += a[j] * a[j];
            sb += b[j] * b[j];
          }
          part[i] = sa;
          part[i + half] = sb;
        }
        for (int64_t i = 0; i < nb; ++i) total += static_cast<double>(part[i]);
        done += nb * kBlock;
      }
      x += done;
      n -= done;
    }
  }
  ROGA_BLOCKS(n) {
    const C* xf = IO<T>::load(x + o, xb, m);
    C s = 0;
    if (p) {
      const C* pf = IO<T>::load(p + o, pb, m);
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < m; ++j) {
        const C v = (std::abs(pf[j]) + eta) * xf[j];
        s += v * v;
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < m; ++j) s += xf[j] * xf[j];
    }
    total += static_cast<double>(s);
  }
  return total;
}

// b <- p; p += s * g   (adaptive: p += s * ((|p| + eta)^2 * g))
template <typename T>
void perturb(void* pv, const void* gv, void* bv, int64_t n, double s_d, bool adaptive, double eta_d, bool stream) {
  using C = typename IO<T>::C;
  T* p = static_cast<T*>(pv);
  const T* g = static_cast<const T*>(gv);
  T* b = static_cast<T*>(bv);
  const C s = static_cast<C>(s_d), eta = static_cast<C>(eta_d);
  alignas(64) C pb[kBlock], gb[kBlock], ob[kBlock];
  ROGA_EW_BLOCKS(T, n) {
    copy_out(b + o, p + o, m * sizeof(T), stream);  // the backup is write-only
    const C* pf = IO<T>::load(p + o, pb, m);
    const C* gf = IO<T>::load(g + o, gb, m);
    C* of = IO<T>::dst_buf(p + o, ob);
    if (adaptive) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const C w = std::abs(pf[j]) + eta;
        of[j] = pf[j] + s * ((w * w) * gf[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) of[j] = pf[j] + s * gf[j];
    }
    IO<T>::store(p + o, of, m);
  }
}

// a += w * g
template <typename T>
void accumulate(void* av, const void* gv, int64_t n, double w_d) {
  using C = typename IO<T>::C;
  T* a = static_cast<T*>(av);
  const T* g = static_cast<const T*>(gv);
  const C w = static_cast<C>(w_d);
  alignas(64) C ab[kBlock], gb[kBlock];
  ROGA_EW_BLOCKS(T, n) {
    const C* af = IO<T>::load(a + o, ab, m);
    const C* gf = IO<T>::load(g + o, gb, m);
    C* of = IO<T>::dst_buf(a + o, ab);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) of[j] = af[j] + w * gf[j];
    IO<T>::store(a + o, of, m);
  }
}

// A 32-byte vector of C (one AVX2 register; two SSE registers in the baseline build). The
// Gram tiles use it by hand, not `omp simd`, so that their loops can also issue prefetches.
template <typename C>
struct Vec {
  typedef C V __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(C);
  static inline V load(const C* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static inline C sum(const V& v) {
    C s = 0;
    for (int i = 0; i < kLanes; ++i) s += v[i];
    return s;
  }
};

// The next block's storage, prefetched by a tile loop one cache line per stream per 64 bytes of
// C it consumes. A Gram tile does several products per element it loads, so the core reads
// DRAM for only part of the block's time; without this the K = 8 triangle read ~21 GB/s where
// eight streams read alone ~28 (2 threads; in a stand-alone test the prefetch took the tiles
// from ~23 to ~26 GB/s, and prefetching a whole block at once, or further ahead, was slower).
struct Ahead {
  const char* s[4];   // a loop gets ceil(K / loops) <= 4 streams (K = 3, 4: one loop)
  int n = 0;          // streams
  int64_t bytes = 0;  // per stream
  inline void line(int64_t at) const {
    if (at < bytes)
      for (int i = 0; i < n; ++i) __builtin_prefetch(s[i] + at, 0, 3);
  }
};

// step(j) for j = 0, L, 2 L, ... while a whole vector of L elements fits in m, with one
// ah.line per two steps (2 L elements of C are 64 bytes); returns where the scalar tail starts.
template <int L, class Step>
inline int64_t vector_steps(int64_t m, const Ahead& ah, const Step& step) {
  int64_t j = 0;
  for (int64_t at = 0; j + 2 * L <= m; j += 2 * L, at += 64) {
    ah.line(at);
    step(j);
    step(j + L);
  }
  for (; j + L <= m; j += L) step(j);
  return j;
}

// The Gram triangle's tiles: float sums in vector lanes within a block, added to double out.
// tri_tile: the lower triangle of rows r0 .. r0 + RN - 1 (r[0..RN)) against themselves, its
// RN (RN + 1) / 2 sums row by row.
template <typename C, int RN>
inline void tri_tile(const C* const* r, int64_t m, double* out, int r0, const Ahead& ah) {
  using W = Vec<C>;
  using V = typename W::V;
  constexpr int L = W::kLanes, S = RN * (RN + 1) / 2;
  const C* a[RN];
  for (int i = 0; i < RN; ++i) a[i] = r[i];
  V acc[S] = {};
  auto step = [&](int64_t j) {
    V x[RN];
#pragma GCC unroll 4
    for (int i = 0; i < RN; ++i) x[i] = W::load(a[i] + j);
#pragma GCC unroll 4
    for (int i = 0; i < RN; ++i)
#pragma GCC unroll 4
      for (int c = 0; c <= i; ++c) acc[i * (i + 1) / 2 + c] += x[i] * x[c];
  };
  int64_t j = vector_steps<L>(m, ah, step);
  C s[S];
  for (int t = 0; t < S; ++t) s[t] = W::sum(acc[t]);
  for (; j < m; ++j)
    for (int i = 0; i < RN; ++i)
      for (int c = 0; c <= i; ++c) s[i * (i + 1) / 2 + c] += a[i][j] * a[c][j];
  for (int i = 0; i < RN; ++i)
    for (int c = 0; c <= i; ++c) out[(r0 + i) * (r0 + i + 1) / 2 + r0 + c] += static_cast<double>(s[i * (i + 1) / 2 + c]);
}

// rect_tile: ROWS rows (1 or 2) against four columns, all below the diagonal; out[i][c] += sum.
template <typename C, int ROWS>
inline void rect_tile(const C* const* rows, const C* const* cols, int64_t m, double* const* out, const Ahead& ah) {
  using W = Vec<C>;
  using V = typename W::V;
  constexpr int L = W::kLanes;
  const C* a[ROWS];
  for (int i = 0; i < ROWS; ++i) a[i] = rows[i];
  const C *y0 = cols[0], *y1 = cols[1], *y2 = cols[2], *y3 = cols[3];
  V acc[ROWS][4] = {};
  auto step = [&](int64_t j) {
    const V c[4] = {W::load(y0 + j), W::load(y1 + j), W::load(y2 + j), W::load(y3 + j)};
#pragma GCC unroll 2
    for (int i = 0; i < ROWS; ++i) {
      const V x = W::load(a[i] + j);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[i][q] += x * c[q];
    }
  };
  int64_t j = vector_steps<L>(m, ah, step);
  C s[ROWS][4];
  for (int i = 0; i < ROWS; ++i)
    for (int q = 0; q < 4; ++q) s[i][q] = W::sum(acc[i][q]);
  for (; j < m; ++j)
    for (int i = 0; i < ROWS; ++i)
      for (int q = 0; q < 4; ++q) s[i][q] += a[i][j] * cols[q][j];
  for (int i = 0; i < ROWS; ++i)
    for (int q = 0; q < 4; ++q) out[i][q] += static_cast<double>(s[i][q]);
}

// The K x K triangle (K > 2) in 4 x 4 tiles of rows and columns, in the order their loops
// run: f(r0, rn, c0, i). c0 < 0: the tile on the diagonal, rows r0 .. r0 + rn - 1 (rn <= 4)
// against themselves, one loop of (up to) ten sums over four streams. Else one loop below it:
// row r0 + i, and r0 + i + 1 when i + 1 < rn, against columns c0 .. c0 + 3 (eight sums). Each
// loaded element feeds several products: one pair per loop would load two per product, and
// the loads from L1 bound such a loop at K = 8 (40 ms against 26 for reading the 8 sets,
// ResNet-34 list). A last group of fewer than four rows gets tiles of its own size (K = 5
// computed 28 products per element for 15 before). gram counts its loops with this too.
template <class F>
inline void for_each_tile(int k, const F& f) {
  for (int r0 = 0; r0 < k; r0 += 4) {
    const int rn = std::min(4, k - r0);
    f(r0, rn, -1, 0);
    for (int c0 = 0; c0 < r0; c0 += 4)
      for (int i = 0; i < rn; i += 2) f(r0, rn, c0, i);
  }
}

// out[a*(a+1)/2 + b] += <x_a, x_b> for b <= a; every x read once per block
template <typename T>
void gram(const void* const* xs, int k, int64_t n, double* out) {
  using C = typename IO<T>::C;
  std::vector<C> bufs(std::is_same<T, C>::value ? 0 : static_cast<size_t>(k) * kBlock);
  std::vector<const C*> v(k);
  // K != 2: the tile loops per block (each prefetches part of the next block)
  int loops = 0;
  for_each_tile(k, [&](int, int, int, int) { ++loops; });
  std::vector<Ahead> ahead(loops);
  ROGA_BLOCKS(n) {
    for (int a = 0; a < k; ++a)
      v[a] = IO<T>::load(static_cast<const T*>(xs[a]) + o, bufs.data() + (bufs.empty() ? 0 : a * kBlock), m);
    if (k == 2) {  // the SAM family's case: three independent sums in one loop (three chains, not one)
      const C* x = v[0];
      const C* y = v[1];
      C s00 = 0, s10 = 0, s11 = 0;
#pragma omp simd reduction(+ : s00, s10, s11)
      for (int64_t j = 0; j < m; ++j) {
        s00 += x[j] * x[j];
        s10 += y[j] * x[j];
        s11 += y[j] * y[j];
      }
      out[0] += static_cast<double>(s00);
      out[1] += static_cast<double>(s10);
      out[2] += static_cast<double>(s11);
      continue;
    }
    // Stream a's next block is prefetched by loop a * loops / k (streams spread evenly).
    const int64_t next = std::min(kBlock, n - o - m) * static_cast<int64_t>(sizeof(T));
    for (auto& ah : ahead) ah.n = 0;
    for (int a = 0; a < k && next > 0; ++a) {
      Ahead& ah = ahead[a * loops / k];
      ah.s[ah.n++] = reinterpret_cast<const char*>(static_cast<const T*>(xs[a]) + o + m);
      ah.bytes = next;
    }
    int loop = 0;
    for_each_tile(k, [&](int r0, int rn, int c0, int i) {
      const C* const* r = &v[r0];
      const Ahead& ah = ahead[loop++];
      if (c0 < 0) {
        switch (rn) {
          case 1: tri_tile<C, 1>(r, m, out, r0, ah); break;
          case 2: tri_tile<C, 2>(r, m, out, r0, ah); break;
          case 3: tri_tile<C, 3>(r, m, out, r0, ah); break;
          default: tri_tile<C, 4>(r, m, out, r0, ah); break;
        }
        return;
      }
      const bool two = i + 1 < rn;
      double* o2[2] = {&out[(r0 + i) * (r0 + i + 1) / 2 + c0],
                       two ? &out[(r0 + i + 1) * (r0 + i + 2) / 2 + c0] : nullptr};
      if (two)
        rect_tile<C, 2>(&r[i], &v[c0], m, o2, ah);
      else
        rect_tile<C, 1>(&r[i], &v[c0], m, o2, ah);
    });
  }
}

// g[j] (+)= w[0] x[0][j] + ... + w[R-1] x[R-1][j], added in that order (as R loops of one
// stream would: a product, then one rounded add per stream; FMA contraction is off), in one
// loop: a core then has R streams in flight instead of one. First: g is not read (the first
// product starts the sum). With d, the same for d and wd.
template <typename C, int R, bool First>
inline void add_streams(C* g, C* d, const C* const* x, const double* w, const double* wd, int64_t m) {
  const C* x0 = x[0];
  const C* x1 = x[R > 1 ? 1 : 0];
  const C* x2 = x[R > 2 ? 2 : 0];
  const C* x3 = x[R > 3 ? 3 : 0];
  const C w0 = static_cast<C>(w[0]), w1 = static_cast<C>(w[R > 1 ? 1 : 0]), w2 = static_cast<C>(w[R > 2 ? 2 : 0]),
          w3 = static_cast<C>(w[R > 3 ? 3 : 0]);
  if (d) {
    const C d0 = static_cast<C>(wd[0]), d1 = static_cast<C>(wd[R > 1 ? 1 : 0]),
            d2 = static_cast<C>(wd[R > 2 ? 2 : 0]), d3 = static_cast<C>(wd[R > 3 ? 3 : 0]);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      C t = First ? w0 * x0[j] : g[j] + w0 * x0[j];
      C u = First ? d0 * x0[j] : d[j] + d0 * x0[j];
      if (R > 1) t += w1 * x1[j], u += d1 * x1[j];
      if (R > 2) t += w2 * x2[j], u += d2 * x2[j];
      if (R > 3) t += w3 * x3[j], u += d3 * x3[j];
      g[j] = t;
      d[j] = u;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      C t = First ? w0 * x0[j] : g[j] + w0 * x0[j];
      if (R > 1) t += w1 * x1[j];
      if (R > 2) t += w2 * x2[j];
      if (R > 3) t += w3 * x3[j];
      g[j] = t;
    }
  }
}

template <typename C, bool First>
inline void add_streams_n(int r, C* g, C* d, const C* const* x, const double* w, const double* wd, int64_t m) {
  switch (r) {
    case 1: add_streams<C, 1, First>(g, d, x, w, wd, m); break;
    case 2: add_streams<C, 2, First>(g, d, x, w, wd, m); break;
    case 3: add_streams<C, 3, First>(g, d, x, w, wd, m); break;
    default: add_streams<C, 4, First>(g, d, x, w, wd, m); break;
  }
}

// g <- sum_a w[a] * xs[a] over one block (the fused updates' gradient, combine); with d, also
// d <- sum_a wd[a] * xs[a] (the direct row) from the same loads. Per element: a product, then
// one add per further stream, in stream order, however the streams are grouped in loops.
template <typename T>
inline void combine_block(typename IO<T>::C* g, const void* const* xs, const double* w, int k, int64_t o, int64_t m,
                          typename IO<T>::C* xb, typename IO<T>::C* d = nullptr, const double* wd = nullptr) {
  using C = typename IO<T>::C;
  if constexpr (std::is_same<T, C>::value) {
    // Storage used in place: four streams per loop. (16-bit storage is converted one stream
    // at a time into xb, so it stays one loop per stream.)
    for (int i = 0; i < k; i += 4) {
      const int r = std::min(4, k - i);
      const C* x4[4];
      for (int q = 0; q < r; ++q) x4[q] = static_cast<const T*>(xs[i + q]) + o;
      const double* di = d ? wd + i : nullptr;
      if (i == 0)
        add_streams_n<C, true>(r, g, d, x4, w, di, m);
      else
        add_streams_n<C, false>(r, g, d, x4, w + i, di, m);
    }
  } else {
    for (int a = 0; a < k; ++a) {
      const C* xf = IO<T>::load(static_cast<const T*>(xs[a]) + o, xb, m);
      const C wa = static_cast<C>(w[a]);
      if (d) {
        const C da = static_cast<C>(wd[a]);
        if (a == 0) {
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) {
            g[j] = wa * xf[j];
            d[j] = da * xf[j];
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) {
            g[j] += wa * xf[j];
            d[j] += da * xf[j];
          }
        }
      } else if (a == 0) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) g[j] = wa * xf[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) g[j] += wa * xf[j];
      }
    }
  }
}

// out = sum_a w[a] * x_a; a block is fully read before it is written, so out may be an x_a
template <typename T>
void combine(void* outv, const void* const* xs, const double* w_d, int k, int64_t n, bool stream) {
  using C = typename IO<T>::C;
  T* out = static_cast<T*>(outv);
  alignas(64) C acc[kBlock], xb[kBlock];
  ROGA_EW_BLOCKS(T, n) {
    combine_block<T>(acc, xs, w_d, k, o, m, xb);
    if (std::is_same<T, C>::value)
      copy_out(out + o, acc, m * sizeof(T), stream);  // stream only when out is none of the inputs
    else
      IO<T>::store(out + o, acc, m);
  }
}

// Momentum SGD after the block's gradient g (in L1) is known, on storage used in place: weight
// decay, the buffer, the step, in one loop over the source, buffer and parameter streams (as
// the loops of sgd below compute them, one rounding per operation, so the same bits).
// g is the block's gradient buffer (gw = 1, exact) or, for one gradient list, the gradient
// itself (gw its weight: the product combine_block would have stored).
template <typename C, bool Wd, bool Nesterov, bool Direct>
inline void sgd_momentum_tail(C* p, const C* x, C* buf, const C* g, C gw, const C* d, int64_t m, C lr, C mom, C damp,
                              C wd) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    C gj = gw * g[j];
    if (Wd) gj = gj + wd * x[j];
    const C bj = mom * buf[j] + damp * gj;
    buf[j] = bj;
    const C u = Nesterov ? gj + mom * bj : bj;
    p[j] = Direct ? (x[j] - lr * u) - lr * d[j] : x[j] - lr * u;
  }
}

// torch.optim.SGD's update, computed in C and rounded once per stored value.
template <typename T>
void sgd(void* pv, const void* srcv, const void* const* gs, const double* w, int k, void* goutv, void* bufv, int64_t n,
         const SgdSeg& s) {
  using C = typename IO<T>::C;
  T* p = static_cast<T*>(pv);
  const T* src = static_cast<const T*>(srcv);
  T* gout = static_cast<T*>(goutv);
  T* buf = static_cast<T*>(bufv);
  const C lr = static_cast<C>(s.lr), mom = static_cast<C>(s.momentum), damp = static_cast<C>(1 - s.dampening),
          wd = static_cast<C>(s.weight_decay);
  alignas(64) C g[kBlock], xb[kBlock], sb[kBlock], bb[kBlock], ob[kBlock], d[kBlock];
  // Storage used in place, momentum past its first step: the rest of the update is one loop
  // (sgd_momentum_tail). With one gradient list and nothing else asked of the combined
  // gradient (SAM's second step), that loop reads the gradient itself.
  using Tail = void (*)(C*, const C*, C*, const C*, C, const C*, int64_t, C, C, C, C);
  Tail tail = nullptr;
  bool tail_reads_grad = false;
  if constexpr (std::is_same<T, C>::value) {
    if (s.momentum != 0 && !s.first) {
      static constexpr Tail tails[8] = {
          &sgd_momentum_tail<C, false, false, false>, &sgd_momentum_tail<C, false, false, true>,
          &sgd_momentum_tail<C, false, true, false>,  &sgd_momentum_tail<C, false, true, true>,
          &sgd_momentum_tail<C, true, false, false>,  &sgd_momentum_tail<C, true, false, true>,
          &sgd_momentum_tail<C, true, true, false>,   &sgd_momentum_tail<C, true, true, true>};
      tail = tails[(s.weight_decay != 0 ? 4 : 0) | (s.nesterov ? 2 : 0) | (s.direct ? 1 : 0)];
      tail_reads_grad = k == 1 && !gout && !s.maximize && !s.direct;
    }
  }
  ROGA_EW_BLOCKS(T, n) {
    if (!tail_reads_grad) {
      combine_block<T>(g, gs, w, k, o, m, xb, s.direct ? d : nullptr, w + k);
      if (gout) IO<T>::store(gout + o, g, m);  // a separate buffer from g: store copies
      if (s.maximize) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) g[j] = -g[j];
      }
    }
    const C* x = IO<T>::load(src + o, sb, m);
    if constexpr (std::is_same<T, C>::value) {
      if (tail) {
        if (tail_reads_grad)
          tail(p + o, x, buf + o, static_cast<const T*>(gs[0]) + o, static_cast<C>(w[0]), d, m, lr, mom, damp, wd);
        else
          tail(p + o, x, buf + o, g, C(1), d, m, lr, mom, damp, wd);
        continue;
      }
    }
    if (s.weight_decay != 0) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) g[j] = g[j] + wd * x[j];
    }
    if (s.momentum != 0) {
      C* b = IO<T>::dst_buf(buf + o, bb);
      if (s.first) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) b[j] = g[j];
      } else {
        const C* bin = IO<T>::load(buf + o, bb, m);  // bb (16-bit storage) or buf itself: in place
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) b[j] = mom * bin[j] + damp * g[j];
      }
      IO<T>::store(buf + o, b, m);
      if (s.nesterov) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) g[j] = g[j] + mom * b[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) g[j] = b[j];
      }
    }
    C* out = IO<T>::dst_buf(p + o, ob);
    if (s.direct) {  // the update, then the direct row's term: two roundings, one loop
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) out[j] = (x[j] - lr * g[j]) - lr * d[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) out[j] = x[j] - lr * g[j];
    }
    IO<T>::store(p + o, out, m);
  }
}

// torch.optim.Adam / AdamW's update, computed in C and rounded once per stored value.
template <typename T>
void adam(void* pv, const void* srcv, const void* const* gs, const double* w, int k, void* goutv, void* mv, void* vv,
          void* vmaxv, int64_t n, const AdamSeg& s) {
  using C = typename IO<T>::C;
  T* p = static_cast<T*>(pv);
  const T* src = static_cast<const T*>(srcv);
  T *gout = static_cast<T*>(goutv), *mp = static_cast<T*>(mv), *vp = static_cast<T*>(vv),
    *vmaxp = static_cast<T*>(vmaxv);
  const C wd = static_cast<C>(s.weight_decay), decay = static_cast<C>(s.decay_factor),
          a1 = static_cast<C>(1 - s.beta1), b2 = static_cast<C>(s.beta2), a2 = static_cast<C>(1 - s.beta2),
          eps = static_cast<C>(s.eps), bc2 = static_cast<C>(s.bc2_sqrt), step = static_cast<C>(s.step_size);
  alignas(64) C g[kBlock], xb[kBlock], sb[kBlock], x2[kBlock], mb[kBlock], vb[kBlock], qb[kBlock], ob[kBlock],
      d[kBlock];
  ROGA_EW_BLOCKS(T, n) {
    combine_block<T>(g, gs, w, k, o, m, xb, s.direct ? d : nullptr, w + k);
    if (gout) IO<T>::store(gout + o, g, m);
    if (s.maximize) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) g[j] = -g[j];
    }
    const C* x = IO<T>::load(src + o, sb, m);
    if (s.weight_decay != 0) {
      if (s.decoupled) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) x2[j] = x[j] * decay;
        x = x2;
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) g[j] = g[j] + wd * x[j];
      }
    }
    const C* min = IO<T>::load(mp + o, mb, m);
    C* mo = IO<T>::dst_buf(mp + o, mb);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) mo[j] = min[j] + a1 * (g[j] - min[j]);
    IO<T>::store(mp + o, mo, m);
    const C* vin = IO<T>::load(vp + o, vb, m);
    C* vo = IO<T>::dst_buf(vp + o, vb);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) vo[j] = b2 * vin[j] + a2 * g[j] * g[j];
    IO<T>::store(vp + o, vo, m);
    const C* q = vo;
    if (s.amsgrad) {
      const C* qin = IO<T>::load(vmaxp + o, qb, m);
      C* qo = IO<T>::dst_buf(vmaxp + o, qb);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) qo[j] = qin[j] > vo[j] ? qin[j] : vo[j];
      IO<T>::store(vmaxp + o, qo, m);
      q = qo;
    }
    C* out = IO<T>::dst_buf(p + o, ob);
    if (s.direct) {  // the update, then the direct row's term: two roundings, one loop
      const C lr = static_cast<C>(s.lr);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) out[j] = (x[j] - step * (mo[j] / (std::sqrt(q[j]) / bc2 + eps))) - lr * d[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) out[j] = x[j] - step * (mo[j] / (std::sqrt(q[j]) / bc2 + eps));
    }
    IO<T>::store(p + o, out, m);
  }
}

#undef ROGA_BLOCKS
#undef ROGA_EW_BLOCKS

template <typename T>
SegmentKernels make_kernels() {
  return SegmentKernels{&sumsq<T>, &perturb<T>, &accumulate<T>, &gram<T>, &combine<T>, &sgd<T>, &adam<T>};
}

inline KernelTable make_table(const char* name) {
  return KernelTable{name, make_kernels<float>(), make_kernels<double>(), make_kernels<c10::Half>(),
                     make_kernels<c10::BFloat16>()};
}
