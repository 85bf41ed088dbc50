// Decode attention that reads each request's keys and values straight from the KV-cache pages
// (no gathered copy of the history).
//
// Inputs: q [R, KV_HEADS * GQA, D]; k_cache, v_cache [slots, KV_HEADS, D]; block_table [R, P]
// int32; seq_lens [R] int32 (keys 0..len-1 of each request; its query is the last one).
// Output [R, KV_HEADS * GQA, D].
// Template constants: T (dtype of q, cache and output), D, KV_HEADS, GQA, BLOCK (tokens per page),
// WARPS, U, WINDOW (0: none), SCALE_BITS and CAP_BITS (float bits; CAP_BITS 0: no soft-capping).
//
// One CTA per (KV head, request) serves the GQA query heads that share the KV head, so each key
// and value row is read once. Its warps take the keys round-robin, U at a time (their loads in
// flight together); each lane holds D / 32 of the head dimension, and each warp keeps an online
// softmax per query head over its keys. The CTA merges the warps' partial results at the end.
constexpr int N = D / 32;
const float neg_inf = -__int_as_float(0x7f800000);
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int kvh = blockIdx.x;
const int r = blockIdx.y;
const int heads = KV_HEADS * GQA;
const int pages = block_table_shape[1];
const int len = seq_lens[r];
const int first = WINDOW > 0 ? max(0, len - WINDOW) : 0;
const int* table = block_table + (size_t)r * pages;
const size_t q_row = (size_t)r * heads + (size_t)kvh * GQA;

float qv[GQA][N];
float o[GQA][N];
float m[GQA];
float l[GQA];
const float scale = __int_as_float(SCALE_BITS);
#pragma unroll
for (int g = 0; g < GQA; ++g) {
  paged_decode_load<T, N>(q + (q_row + g) * D + lane * N, qv[g]);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    qv[g][i] *= scale;
    o[g][i] = 0.f;
  }
  m[g] = neg_inf;
  l[g] = 0.f;
}

for (int j0 = first + warp * U; j0 < len; j0 += WARPS * U) {
  float kr[U][N];
  float vr[U][N];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int j = j0 + u;
    if (j < len) {
      const size_t row = ((size_t)table[j / BLOCK] * BLOCK + j % BLOCK) * KV_HEADS + kvh;
      paged_decode_load<T, N>(k_cache + row * D + lane * N, kr[u]);
      paged_decode_load<T, N>(v_cache + row * D + lane * N, vr[u]);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        kr[u][i] = 0.f;
        vr[u][i] = 0.f;
      }
    }
  }
  float s[GQA][U];
#pragma unroll
  for (int g = 0; g < GQA; ++g) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        acc += qv[g][i] * kr[u][i];
      }
      s[g][u] = acc;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int g = 0; g < GQA; ++g) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], off);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GQA; ++g) {
    float m_new = m[g];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if constexpr (CAP_BITS != 0) {
        const float cap = __int_as_float(CAP_BITS);
        s[g][u] = cap * tanhf(s[g][u] / cap);
      }
      if (j0 + u >= len) {
        s[g][u] = neg_inf;
      }
      m_new = fmaxf(m_new, s[g][u]);
    }
    const float alpha = __expf(m[g] - m_new);
    l[g] *= alpha;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      o[g][i] *= alpha;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float p = __expf(s[g][u] - m_new);
      l[g] += p;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        o[g][i] += p * vr[u][i];
      }
    }
    m[g] = m_new;
  }
}

__shared__ float part_m[WARPS][GQA];
__shared__ float part_l[WARPS][GQA];
__shared__ float part_o[WARPS][GQA][D];
#pragma unroll
for (int g = 0; g < GQA; ++g) {
  if (lane == 0) {
    part_m[warp][g] = m[g];
    part_l[warp][g] = l[g];
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    part_o[warp][g][lane * N + i] = o[g][i];
  }
}
__syncthreads();
for (int x = threadIdx.x; x < GQA * D; x += WARPS * 32) {
  const int g = x / D;
  const int d = x % D;
  float mx = neg_inf;
  for (int w = 0; w < WARPS; ++w) {
    mx = fmaxf(mx, part_m[w][g]);
  }
  float total = 0.f;
  float acc = 0.f;
  for (int w = 0; w < WARPS; ++w) {
    if (part_m[w][g] != neg_inf) {
      const float f = __expf(part_m[w][g] - mx);
      total += part_l[w][g] * f;
      acc += part_o[w][g][d] * f;
    }
  }
  out[(q_row + g) * D + d] = static_cast<T>(total > 0.f ? acc / total : 0.f);
}
