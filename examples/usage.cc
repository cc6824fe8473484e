#include <omniattn/omniattn.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  // Decoding-style GQA step: 4 new queries attend to 16 cached keys; 8 query heads share 2 K/V heads.
  const std::int64_t batch = 2, seq_q = 4, seq_k = 16, heads_q = 8, heads_kv = 2, dim = 64;
  std::vector<float> q(batch * seq_q * heads_q * dim), out(q.size());
  std::vector<float> k(batch * seq_k * heads_kv * dim), v(k.size());
  std::vector<float> lse(batch * heads_q * seq_q);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.01f * static_cast<float>(i));
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::cos(0.02f * static_cast<float>(i));
    v[i] = 0.001f * static_cast<float>(i);
  }

  using namespace omniattn;
  spec s;
  s.causal = causal_mode::bottom_right;  // the last query sees the last key (FlashAttention >= 2.1)
  const lse_tensor l = make_lse(lse.data(), heads_q, seq_q);
  options opt;
  opt.lse = &l;  // also return log-sum-exp, [batch, heads_q, seq_q]

  const status st = attention(make_bshd(q.data(), dtype::f32, batch, seq_q, heads_q, dim),
                              make_bshd(k.data(), dtype::f32, batch, seq_k, heads_kv, dim),
                              make_bshd(v.data(), dtype::f32, batch, seq_k, heads_kv, dim),
                              make_bshd(out.data(), dtype::f32, batch, seq_q, heads_q, dim), s, opt);
  if (!st.ok()) {
    std::fprintf(stderr, "attention failed: %s\n", st.error.c_str());
    return 1;
  }
  for (float x : out) {
    if (!std::isfinite(x)) return 1;
  }
  for (float x : lse) {
    if (!std::isfinite(x)) return 1;
  }
  std::printf("out[0] = %f, lse[0] = %f\n", out[0], lse[0]);
  return 0;
}
