// Inner loops of the CPU ops over one contiguous run of elements ("segment").
//
// This file is included twice, inside namespace roga::cpu::base (compiled for the baseline
// x86-64/AArch64 ISA) and roga::cpu::avx2 (under #pragma GCC target("avx2,fma,f16c")),
// and the fastest table the CPU supports is chosen at load time. It includes nothing:
// every header it needs is included by the two translation units before the pragma.
//
// Storage types float16/bfloat16 are converted in blocks of kBlock elements to float32
// buffers that stay in L1, so every loop below runs on plain float arrays and vectorizes;
// float32/float64 storage is used in place (no copy). Math is float32 (float64 for float64
// storage); reductions use float32 SIMD lanes within a block and a double across blocks.

constexpr int64_t kBlock = 512;

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

// sum x^2, or with p: sum ((|p| + eta) x)^2 (the ASAM norm)
template <typename T>
double sumsq(const void* xv, const void* pv, int64_t n, double eta_d) {
  using C = typename IO<T>::C;
  const T* x = static_cast<const T*>(xv);
  const T* p = static_cast<const T*>(pv);
  const C eta = static_cast<C>(eta_d);
  alignas(64) C xb[kBlock], pb[kBlock];
  double total = 0;
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
  ROGA_BLOCKS(n) {
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
  ROGA_BLOCKS(n) {
    const C* af = IO<T>::load(a + o, ab, m);
    const C* gf = IO<T>::load(g + o, gb, m);
    C* of = IO<T>::dst_buf(a + o, ab);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) of[j] = af[j] + w * gf[j];
    IO<T>::store(a + o, of, m);
  }
}

// out[a*(a+1)/2 + b] += <x_a, x_b> for b <= a; every x read once per block
template <typename T>
void gram(const void* const* xs, int k, int64_t n, double* out) {
  using C = typename IO<T>::C;
  std::vector<C> bufs(std::is_same<T, C>::value ? 0 : static_cast<size_t>(k) * kBlock);
  std::vector<const C*> v(k);
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
    // K > 2: two rows of the triangle at a time against four columns, eight independent
    // sums per loop: each loaded element feeds two (row) or four (column) products, where
    // one pair per sum loads two per product. The loads from L1, not memory, bound a
    // one-pair loop at K = 8 (40 ms against 26 for reading the 8 sets, ResNet-34 list).
    // Slots past the triangle (column > row, a missing second row) repeat a valid operand
    // and are dropped.
    for (int r0 = 0; r0 < k; r0 += 2) {
      const int r1 = r0 + 1 < k ? r0 + 1 : r0;
      const C* a0 = v[r0];
      const C* a1 = v[r1];
      for (int c = 0; c <= r1; c += 4) {
        const C* y[4];
        for (int i = 0; i < 4; ++i) y[i] = v[c + i <= r1 ? c + i : c];
        const C *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
        C s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
        for (int64_t j = 0; j < m; ++j) {
          const C x0 = a0[j], x1 = a1[j];
          s00 += x0 * y0[j];
          s01 += x0 * y1[j];
          s02 += x0 * y2[j];
          s03 += x0 * y3[j];
          s10 += x1 * y0[j];
          s11 += x1 * y1[j];
          s12 += x1 * y2[j];
          s13 += x1 * y3[j];
        }
        const C s[2][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}};
        for (int i = 0; i < 4 && c + i <= r1; ++i) {
          if (c + i <= r0) out[r0 * (r0 + 1) / 2 + c + i] += static_cast<double>(s[0][i]);
          if (r1 != r0) out[r1 * (r1 + 1) / 2 + c + i] += static_cast<double>(s[1][i]);
        }
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
  ROGA_BLOCKS(n) {
    for (int a = 0; a < k; ++a) {
      const C* xf = IO<T>::load(static_cast<const T*>(xs[a]) + o, xb, m);
      const C w = static_cast<C>(w_d[a]);
      if (a == 0) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) acc[j] = w * xf[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) acc[j] += w * xf[j];
      }
    }
    if (std::is_same<T, C>::value)
      copy_out(out + o, acc, m * sizeof(T), stream);  // stream only when out is none of the inputs
    else
      IO<T>::store(out + o, acc, m);
  }
}

// g <- sum_a w[a] * xs[a] over one block (the fused updates' gradient); with d, also
// d <- sum_a wd[a] * xs[a] (the direct row) from the same loads
template <typename T>
inline void combine_block(typename IO<T>::C* g, const void* const* xs, const double* w, int k, int64_t o, int64_t m,
                          typename IO<T>::C* xb, typename IO<T>::C* d = nullptr, const double* wd = nullptr) {
  using C = typename IO<T>::C;
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
  ROGA_BLOCKS(n) {
    combine_block<T>(g, gs, w, k, o, m, xb, s.direct ? d : nullptr, w + k);
    if (gout) IO<T>::store(gout + o, g, m);  // a separate buffer from g: store copies
    if (s.maximize) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) g[j] = -g[j];
    }
    const C* x = IO<T>::load(src + o, sb, m);
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
  ROGA_BLOCKS(n) {
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

template <typename T>
SegmentKernels make_kernels() {
  return SegmentKernels{&sumsq<T>, &perturb<T>, &accumulate<T>, &gram<T>, &combine<T>, &sgd<T>, &adam<T>};
}

inline KernelTable make_table(const char* name) {
  return KernelTable{name, make_kernels<float>(), make_kernels<double>(), make_kernels<c10::Half>(),
                     make_kernels<c10::BFloat16>()};
}
