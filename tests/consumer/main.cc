// Smallest downstream use of an installed omniattn: one tiny f32 problem on the reference backend.
#include <omniattn/omniattn.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const std::int64_t batch = 1, seq = 3, heads = 2, dim = 4;
  std::vector<float> q(batch * seq * heads * dim), k(q.size()), v(q.size()), out(q.size(), NAN);
  for (std::size_t i = 0; i < q.size(); ++i) {
    q[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
    k[i] = 0.05f * static_cast<float>(i % 5);
    v[i] = static_cast<float>(i % 3) - 1.0f;
  }
  using namespace omniattn;
  options opt;
  opt.use = backend::reference;
  const status st = attention(make_bshd(q.data(), dtype::f32, batch, seq, heads, dim),
                              make_bshd(k.data(), dtype::f32, batch, seq, heads, dim),
                              make_bshd(v.data(), dtype::f32, batch, seq, heads, dim),
                              make_bshd(out.data(), dtype::f32, batch, seq, heads, dim), spec{}, opt);
  if (!st.ok()) {
    std::fprintf(stderr, "consumer: attention failed: %s\n", st.error.c_str());
    return 1;
  }
  for (float x : out) {
    if (!std::isfinite(x)) {
      std::fprintf(stderr, "consumer: non-finite output\n");
      return 1;
    }
  }
  std::printf("consumer: omniattn %d.%d.%d ok, out[0] = %g\n", OMNIATTN_VERSION_MAJOR, OMNIATTN_VERSION_MINOR,
              OMNIATTN_VERSION_PATCH, static_cast<double>(out[0]));
  return 0;
}
