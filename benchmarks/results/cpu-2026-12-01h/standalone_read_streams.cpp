// Stand-alone read ceiling: 8 arrays of 21.3M floats summed by two OpenMP threads, reading
// S = 1, 2, 4 or 8 arrays in one loop (8 / S loops). Prints GB/s (all 8 arrays' bytes).
//   g++ -O3 -fopenmp -mavx2 -mfma standalone_read_streams.cpp -o r && OMP_NUM_THREADS=2 ./r
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cstdint>
int main(){
  int64_t n=21300000; std::vector<float*> x(8);
  for(int a=0;a<8;++a){x[a]=(float*)aligned_alloc(64,n*4); for(int64_t i=0;i<n;++i) x[a][i]=1;}
  for(int rep=0;rep<7;++rep){
   for(int S: {1,2,4,8}){
    auto t0=std::chrono::steady_clock::now(); double tot=0;
    for(int g=0; g<8; g+=S){
      double acc=0;
      #pragma omp parallel for reduction(+:acc) schedule(static)
      for(int64_t b=0;b<n;b+=512){
        int64_t m=std::min<int64_t>(512,n-b); float s=0;
        if(S==1){ const float* p=x[g]+b;
          #pragma omp simd reduction(+:s)
          for(int64_t j=0;j<m;++j) s+=p[j]; }
        else if(S==2){ const float *p=x[g]+b,*q=x[g+1]+b;
          #pragma omp simd reduction(+:s)
          for(int64_t j=0;j<m;++j) s+=p[j]+q[j]; }
        else if(S==4){ const float *p=x[g]+b,*q=x[g+1]+b,*r=x[g+2]+b,*u=x[g+3]+b;
          #pragma omp simd reduction(+:s)
          for(int64_t j=0;j<m;++j) s+=(p[j]+q[j])+(r[j]+u[j]); }
        else { const float *p0=x[0]+b,*p1=x[1]+b,*p2=x[2]+b,*p3=x[3]+b,*p4=x[4]+b,*p5=x[5]+b,*p6=x[6]+b,*p7=x[7]+b;
          #pragma omp simd reduction(+:s)
          for(int64_t j=0;j<m;++j) s+=((p0[j]+p1[j])+(p2[j]+p3[j]))+((p4[j]+p5[j])+(p6[j]+p7[j])); }
        acc+=s;
      }
      tot+=acc;
    }
    double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
    printf("streams%d %.1f GB/s %.1f ms (%g)\n",S,32.0*n/s/1e9,s*1e3,tot);
   }
  }
}
