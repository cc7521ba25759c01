// Stand-alone K = 8 Gram pass (the library's 4 x 4 tiles, written with intrinsics) over 8
// arrays of 21.3M floats, two OpenMP threads each on one half, with and without prefetching
// the block D ahead: nopf (none), d1t0 (next block, one line per stream per 64 bytes consumed,
// spread over the four tile loops), burst / bursT2 (the same lines, all issued before each
// loop, into L1 / L3). Prints GB/s (32 bytes per element) per variant and round.
//   g++ -O3 -fopenmp -mavx2 -mfma -ffp-contract=off standalone_gram_k8.cpp -o g && OMP_NUM_THREADS=2 ./g
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cstdint>
static inline float hsum(__m256 v){ __m128 a=_mm_add_ps(_mm256_castps256_ps128(v),_mm256_extractf128_ps(v,1)); a=_mm_add_ps(a,_mm_movehl_ps(a,a)); a=_mm_add_ss(a,_mm_shuffle_ps(a,a,1)); return _mm_cvtss_f32(a);}
int D = 0; int BURST = 0; int HINT = 0;
template<int H> static inline void pf(const float* p){ _mm_prefetch((const char*)p, H==0?_MM_HINT_T0:H==1?_MM_HINT_T1:_MM_HINT_T2); }
static inline void pfh(const float* p){ if(HINT==0) pf<0>(p); else if(HINT==1) pf<1>(p); else pf<2>(p); }
// m multiple of 16 assumed (512)
static void tri(const float* const* r, int64_t m, double* out, const float* pa, const float* pb) {
  __m256 s[10]; for(int i=0;i<10;++i) s[i]=_mm256_setzero_ps();
  for (int64_t j=0;j<m;j+=16){
    if (pa) { pfh(pa + j); pfh(pb + j); }
    for (int u=0;u<16;u+=8){
    __m256 x0=_mm256_load_ps(r[0]+j+u), x1=_mm256_load_ps(r[1]+j+u), x2=_mm256_load_ps(r[2]+j+u), x3=_mm256_load_ps(r[3]+j+u);
    s[0]=_mm256_add_ps(s[0],_mm256_mul_ps(x0,x0)); s[1]=_mm256_add_ps(s[1],_mm256_mul_ps(x1,x0)); s[2]=_mm256_add_ps(s[2],_mm256_mul_ps(x1,x1));
    s[3]=_mm256_add_ps(s[3],_mm256_mul_ps(x2,x0)); s[4]=_mm256_add_ps(s[4],_mm256_mul_ps(x2,x1)); s[5]=_mm256_add_ps(s[5],_mm256_mul_ps(x2,x2));
    s[6]=_mm256_add_ps(s[6],_mm256_mul_ps(x3,x0)); s[7]=_mm256_add_ps(s[7],_mm256_mul_ps(x3,x1)); s[8]=_mm256_add_ps(s[8],_mm256_mul_ps(x3,x2)); s[9]=_mm256_add_ps(s[9],_mm256_mul_ps(x3,x3));
    }
  }
  for(int i=0;i<10;++i) out[i]+=hsum(s[i]);
}
static void rect(const float* a0, const float* a1, const float* const* y, int64_t m, double* out, const float* pa, const float* pb) {
  __m256 s[8]; for(int i=0;i<8;++i) s[i]=_mm256_setzero_ps();
  for (int64_t j=0;j<m;j+=16){
    if (pa) { pfh(pa + j); pfh(pb + j); }
    for (int u=0;u<16;u+=8){
    __m256 x0=_mm256_load_ps(a0+j+u), x1=_mm256_load_ps(a1+j+u);
    for(int c=0;c<4;++c){ __m256 yc=_mm256_load_ps(y[c]+j+u); s[c]=_mm256_add_ps(s[c],_mm256_mul_ps(x0,yc)); s[4+c]=_mm256_add_ps(s[4+c],_mm256_mul_ps(x1,yc)); }
    }
  }
  for(int i=0;i<8;++i) out[i]+=hsum(s[i]);
}
static void gram8(const float* const* x, int64_t n, double* out) {
  const int64_t B=512;
  for (int64_t o=0;o<n;o+=B){
    const float* v[8]; for(int a=0;a<8;++a) v[a]=x[a]+o;
    const bool p = D>0 && o + (D+1)*B <= n;
    const float* q[8]; for(int a=0;a<8;++a) q[a]= p ? v[a]+D*B : nullptr;
    if (BURST) {
      auto burst = [&](const float* a, const float* b) { if (!a) return; for (int64_t j = 0; j < B; j += 16) { pfh(a + j); pfh(b + j); } };
      burst(q[0], q[1]); tri(v, B, out, nullptr, nullptr);
      burst(q[2], q[3]); tri(v+4, B, out+10, nullptr, nullptr);
      burst(q[4], q[5]); rect(v[4], v[5], v, B, out+20, nullptr, nullptr);
      burst(q[6], q[7]); rect(v[6], v[7], v, B, out+28, nullptr, nullptr);
    } else {
    tri(v, B, out, q[0], q[1]);
    tri(v+4, B, out+10, q[2], q[3]);
    rect(v[4], v[5], v, B, out+20, q[4], q[5]);
    rect(v[6], v[7], v, B, out+28, q[6], q[7]);
    }
  }
}
int main(int argc,char**argv){
  int64_t n=21299200; // multiple of 512*2
  std::vector<float*> x(8);
  for(int a=0;a<8;++a){x[a]=(float*)aligned_alloc(64,n*4); for(int64_t i=0;i<n;++i) x[a][i]=(i%97)*1e-3f+a;}
  struct Cfg{int d,h; const char* name;} cfgs[]={{0,0,"nopf"},{1,0,"d1t0"},{1,0,"burst"},{1,2,"bursT2"}};
  for(int rep=0;rep<11;++rep) for(auto& c: cfgs){ D=c.d; HINT=c.h; BURST = c.name[0]=='b';
    std::vector<double> outs(2*64,0.0);
    auto t0=std::chrono::steady_clock::now();
#pragma omp parallel
    { int t=omp_get_thread_num(); int64_t lo = t==0 ? 0 : n/2, hi = t==0 ? n/2 : n;
      const float* xs[8]; for(int a=0;a<8;++a) xs[a]=x[a]+lo; gram8(xs,hi-lo,&outs[t*64]); }
    double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
    printf("%s %.1f\n", c.name, 32.0*n/s/1e9);
  }
}
