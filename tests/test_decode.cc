// The paged KV cache and attention on it (include/omniattn/kv_cache.h): cache operations, the decode oracle against
// the forward oracle on the full sequence, the CPU decode kernel against the decode oracle on seeded sweeps (page
// sizes 1 .. 80, storage dtypes, GQA ratios, masks and scores, evicted slots, shared prefixes), determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "omniattn/omniattn.h"
#include "test_common.h"
#include "tolerance.h"

namespace omniattn::test {
namespace {

constexpr float neg_inf = -std::numeric_limits<float>::infinity();

// Values exactly representable in the storage dtype, so the cache holds what the full-sequence reference reads.
std::vector<float> random_values(std::int64_t n, std::mt19937_64& rng, dtype storage, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (float& v : x) {
    v = nd(rng);
    if (storage == dtype::bf16) v = bf16_to_f32(f32_to_bf16(v));
    if (storage == dtype::f16) v = f16_to_f32(f32_to_f16(v));
  }
  return x;
}

// One sequence's K / V as [L, heads, dim] rows (what is appended, and what the full-sequence reference reads).
struct seq_kv {
  std::int64_t len = 0;
  std::vector<float> k, v;
};

seq_kv make_seq(std::int64_t len, std::int64_t hkv, std::int64_t d, std::int64_t dv, std::mt19937_64& rng, dtype storage) {
  return {len, random_values(len * hkv * d, rng, storage), random_values(len * hkv * dv, rng, storage)};
}

// Appends tokens [from, to) of s in chunks of `chunk`.
void append_range(kv_cache& c, std::int64_t seq, const seq_kv& s, std::int64_t from, std::int64_t to, std::int64_t chunk) {
  const kv_cache_config& cfg = c.config();
  const std::int64_t dv = cfg.dim_v ? cfg.dim_v : cfg.dim_qk;
  for (std::int64_t t = from; t < to; t += chunk) {
    const std::int64_t n = std::min(chunk, to - t);
    const tensor k = make_bshd(const_cast<float*>(s.k.data()) + t * cfg.heads_kv * cfg.dim_qk, dtype::f32, 1, n, cfg.heads_kv, cfg.dim_qk);
    const tensor v = make_bshd(const_cast<float*>(s.v.data()) + t * cfg.heads_kv * dv, dtype::f32, 1, n, cfg.heads_kv, dv);
    const status st = c.append(seq, k, v);
    ASSERT_TRUE(st.ok()) << st.error;
  }
}

struct decode_out {
  std::vector<float> out, lse;
  status st;
};

decode_out run_decode(const kv_cache& c, const std::vector<std::int64_t>& seqs, const std::vector<float>& q, std::int64_t lq,
                      std::int64_t hq, const spec& s, backend b, int threads = 0, float* mass = nullptr, std::int64_t slots = 0) {
  const kv_cache_config& cfg = c.config();
  const std::int64_t dv = cfg.dim_v ? cfg.dim_v : cfg.dim_qk;
  const auto batch = static_cast<std::int64_t>(seqs.size());
  decode_out r;
  r.out.assign(static_cast<std::size_t>(batch * lq * hq * dv), 12345.0f);
  r.lse.assign(static_cast<std::size_t>(batch * hq * lq), 12345.0f);
  const lse_tensor lse = make_lse(r.lse.data(), hq, lq);
  lse_tensor lse_b = lse;
  lse_b.stride_batch = hq * lq;
  decode_options o;
  o.use = b;
  o.threads = threads;
  o.lse = &lse_b;
  o.key_mass = mass;
  o.key_mass_slots = slots;
  r.st = attention_decode(make_bshd(const_cast<float*>(q.data()), dtype::f32, batch, lq, hq, cfg.dim_qk), c, seqs,
                          make_bshd(r.out.data(), dtype::f32, batch, lq, hq, dv), s, o);
  return r;
}

// Kernel against oracle under the decode tolerance (tolerance.h).
::testing::AssertionResult decode_close(const decode_out& got, const decode_out& ref, const std::string& what) {
  if (!got.st.ok()) return ::testing::AssertionFailure() << what << ": kernel failed: " << got.st.error;
  if (!ref.st.ok()) return ::testing::AssertionFailure() << what << ": oracle failed: " << ref.st.error;
  double omax = 1.0, lmax = 1.0;
  for (float x : ref.out) omax = std::max(omax, std::fabs(static_cast<double>(x)));
  for (float x : ref.lse)
    if (std::isfinite(x)) lmax = std::max(lmax, std::fabs(static_cast<double>(x)));
  const double otol = k_decode_out_eps * dtype_eps(dtype::f32) * omax, ltol = k_decode_lse_eps * dtype_eps(dtype::f32) * lmax;
  for (std::size_t i = 0; i < got.out.size(); ++i)
    if (!(std::fabs(static_cast<double>(got.out[i]) - ref.out[i]) <= otol))
      return ::testing::AssertionFailure() << what << ": out[" << i << "] " << got.out[i] << " vs oracle " << ref.out[i]
                                           << " (tol " << otol << ")";
  for (std::size_t i = 0; i < got.lse.size(); ++i) {
    if (std::isinf(ref.lse[i]) || std::isinf(got.lse[i])) {
      if (got.lse[i] != ref.lse[i])
        return ::testing::AssertionFailure() << what << ": lse[" << i << "] " << got.lse[i] << " vs oracle " << ref.lse[i];
      continue;
    }
    if (!(std::fabs(static_cast<double>(got.lse[i]) - ref.lse[i]) <= ltol))
      return ::testing::AssertionFailure() << what << ": lse[" << i << "] " << got.lse[i] << " vs oracle " << ref.lse[i]
                                           << " (tol " << ltol << ")";
  }
  return ::testing::AssertionSuccess();
}

// The full-sequence forward oracle's rows L - lq .. L - 1 of one sequence (Lq = Lk = L, bottom-right causal).
decode_out full_sequence_rows(const seq_kv& s, const std::vector<float>& q_rows, std::int64_t lq, std::int64_t hq,
                              std::int64_t hkv, std::int64_t d, std::int64_t dv, const spec& sp, std::mt19937_64& rng) {
  const std::int64_t L = s.len;
  std::vector<float> q = random_values(L * hq * d, rng, dtype::f32);
  std::copy(q_rows.begin(), q_rows.end(), q.begin() + (L - lq) * hq * d);
  std::vector<float> out(static_cast<std::size_t>(L * hq * dv)), lse(static_cast<std::size_t>(hq * L));
  const lse_tensor lt = make_lse(lse.data(), hq, L);
  options o;
  o.use = backend::reference;
  o.lse = &lt;
  decode_out r;
  r.st = attention(make_bshd(q.data(), dtype::f32, 1, L, hq, d), make_bshd(const_cast<float*>(s.k.data()), dtype::f32, 1, L, hkv, d),
                   make_bshd(const_cast<float*>(s.v.data()), dtype::f32, 1, L, hkv, dv), make_bshd(out.data(), dtype::f32, 1, L, hq, dv),
                   sp, o);
  r.out.assign(out.begin() + (L - lq) * hq * dv, out.end());
  for (std::int64_t h = 0; h < hq; ++h)
    for (std::int64_t i = 0; i < lq; ++i) r.lse.push_back(lse[static_cast<std::size_t>(h * L + L - lq + i)]);
  return r;
}

::testing::AssertionResult oracles_agree(const decode_out& got, const decode_out& want, const std::string& what) {
  if (!got.st.ok() || !want.st.ok()) return ::testing::AssertionFailure() << what << ": " << got.st.error << want.st.error;
  double mag = 1.0;
  for (float x : want.out) mag = std::max(mag, std::fabs(static_cast<double>(x)));
  for (std::size_t i = 0; i < got.out.size(); ++i)
    if (auto r = oracle_near(got.out[i], want.out[i], mag); !r) return r << " (" << what << ", out " << i << ")";
  for (std::size_t i = 0; i < got.lse.size(); ++i) {
    if (std::isinf(want.lse[i]) || std::isinf(got.lse[i])) {
      if (got.lse[i] != want.lse[i]) return ::testing::AssertionFailure() << what << ": lse " << got.lse[i] << " vs " << want.lse[i];
      continue;
    }
    if (auto r = oracle_near(got.lse[i], want.lse[i], std::max(1.0, std::fabs(static_cast<double>(want.lse[i])))); !r)
      return r << " (" << what << ", lse " << i << ")";
  }
  return ::testing::AssertionSuccess();
}

// The spec variants every decode sweep runs (absolute positions: masks see token indices).
std::vector<std::pair<std::string, spec>> spec_variants(std::int64_t hq, std::int64_t L) {
  std::vector<std::pair<std::string, spec>> v;
  spec causal;
  causal.causal = causal_mode::bottom_right;
  v.emplace_back("causal", causal);
  spec streaming;
  streaming.mask = mask_expr::causal(causal_mode::bottom_right) & (mask_expr::window(9, 0, causal_mode::bottom_right) | mask_expr::sinks(3));
  v.emplace_back("causal&(window(9,0)|sinks(3))", streaming);
  spec doc;
  doc.mask = mask_expr::document({0, L / 3, L / 3 + 5 < L ? L / 3 + 5 : L, L}) & mask_expr::causal(causal_mode::bottom_right);
  v.emplace_back("document&causal", doc);
  spec block;
  block.mask = mask_expr::block_causal(4);
  v.emplace_back("block_causal(4)", block);
  spec full;
  v.emplace_back("full", full);
  spec alibi = causal;
  std::vector<double> slopes;
  for (std::int64_t h = 0; h < hq; ++h) slopes.push_back(0.5 / static_cast<double>(h + 1));
  alibi.score = scores::then(scores::alibi(slopes), scores::softcap(5.0));
  v.emplace_back("causal+alibi+softcap", alibi);
  spec user = causal;
  user.mask = mask_expr::causal(causal_mode::bottom_right) & mask_expr::predicate([](std::int64_t, std::int64_t h, std::int64_t i, std::int64_t j) {
    return (i + j + h) % 3 != 0;
  }, "mod3");
  user.score = [](double s, std::int64_t, std::int64_t h, std::int64_t q, std::int64_t k) { return s + 0.01 * static_cast<double>((q - k) % 7) - 0.1 * h; };
  v.emplace_back("user mask+score", user);
  return v;
}

std::vector<float> sink_values(std::int64_t hq) {
  std::vector<float> s;
  for (std::int64_t h = 0; h < hq; ++h) s.push_back(0.3f * static_cast<float>(h) - 0.5f);
  return s;
}

TEST(KvCache, AppendAcrossPagesReadsBackWhatWasAppended) {
  std::mt19937_64 rng(1);
  for (std::int64_t page : {1, 7, 16, 33, 64}) {
    for (dtype st : {dtype::f32, dtype::bf16, dtype::f16}) {
      kv_cache c({2, 5, 3, page, st, std::nullopt});
      const std::int64_t seq = c.add_sequence();
      const seq_kv s = make_seq(71, 2, 5, 3, rng, st);
      append_range(c, seq, s, 0, 40, 13);
      append_range(c, seq, s, 40, 71, 1);
      EXPECT_EQ(c.length(seq), 71);
      for (std::int64_t h = 0; h < 2; ++h) {
        std::vector<float> k, v;
        ASSERT_TRUE(c.read(seq, h, k, v).ok());
        ASSERT_EQ(k.size(), 71u * 5);
        for (std::int64_t t = 0; t < 71; ++t) {
          for (std::int64_t d = 0; d < 5; ++d) ASSERT_EQ(k[t * 5 + d], s.k[(t * 2 + h) * 5 + d]) << page << " " << t;
          for (std::int64_t d = 0; d < 3; ++d) ASSERT_EQ(v[t * 3 + d], s.v[(t * 2 + h) * 3 + d]) << page << " " << t;
        }
        EXPECT_EQ(c.cached(seq, h), 71);
      }
      EXPECT_EQ(c.memory().pages_in_use, 2 * ((71 + page - 1) / page));
    }
  }
}

TEST(KvCache, MemoryPerTokenIsTheKvBytesPlusUnderOnePercent) {
  // D = 128, bf16, pages of 32: the page table, slot indices and counters against the K / V bytes (the slot
  // indices, 4 bytes per cached token and head, are 0.78% of it).
  kv_cache c({8, 128, 128, 32, dtype::bf16, std::nullopt});
  const std::int64_t seq = c.add_sequence();
  std::vector<float> k(static_cast<std::size_t>(4096 * 8 * 128), 0.5f);
  ASSERT_TRUE(c.append(seq, make_bshd(k.data(), dtype::f32, 1, 4096, 8, 128), make_bshd(k.data(), dtype::f32, 1, 4096, 8, 128)).ok());
  const kv_cache_memory m = c.memory();
  const double kv_bytes = 4096.0 * 8 * 2 * 128 * 2;
  EXPECT_EQ(m.data_bytes, static_cast<std::int64_t>(kv_bytes));
  EXPECT_LT(static_cast<double>(m.metadata_bytes) / kv_bytes, 0.01) << m.metadata_bytes;
  EXPECT_EQ(m.tokens, 4096 * 8);
}

TEST(KvCache, ForkSharesPagesAndCopiesOnWrite) {
  std::mt19937_64 rng(2);
  kv_cache c({1, 4, 4, 8, dtype::f32, std::nullopt});
  const std::int64_t a = c.add_sequence();
  const seq_kv s = make_seq(20, 1, 4, 4, rng, dtype::f32);
  append_range(c, a, s, 0, 20, 20);
  const std::int64_t pages = c.memory().pages_in_use;
  std::int64_t b = -1;
  ASSERT_TRUE(c.fork(a, b).ok());
  EXPECT_EQ(c.memory().pages_in_use, pages);  // shared, not copied
  const seq_kv extra = make_seq(3, 1, 4, 4, rng, dtype::f32);
  append_range(c, b, extra, 0, 3, 3);
  // The partially filled last page was copied for b; a still reads its own 20 tokens.
  EXPECT_EQ(c.memory().pages_in_use, pages + 1);
  std::vector<float> ka, va, kb, vb;
  ASSERT_TRUE(c.read(a, 0, ka, va).ok());
  ASSERT_TRUE(c.read(b, 0, kb, vb).ok());
  EXPECT_EQ(ka, std::vector<float>(s.k.begin(), s.k.end()));
  ASSERT_EQ(kb.size(), 23u * 4);
  EXPECT_TRUE(std::equal(extra.k.begin(), extra.k.end(), kb.begin() + 20 * 4));
  EXPECT_EQ(c.length(b), 23);
  EXPECT_EQ(c.length(a), 20);
  ASSERT_TRUE(c.free_sequence(a).ok());
  EXPECT_EQ(c.memory().pages_in_use, pages);  // b holds the two full pages it shared and its copy of the last
  ASSERT_TRUE(c.free_sequence(b).ok());
  EXPECT_EQ(c.memory().pages_in_use, 0);
  EXPECT_GT(c.memory().pages_free, 0);
  ASSERT_TRUE(c.shrink().ok());
  EXPECT_EQ(c.memory().pages_free, 0);
}

TEST(KvCache, StreamingEvictionKeepsSinksAndWindowAndFreesPages) {
  std::mt19937_64 rng(3);
  kv_cache c({2, 4, 4, 4, dtype::f32, std::nullopt});
  ASSERT_TRUE(c.set_eviction(0, {2, 6}).ok());  // head 0 streams; head 1 keeps everything (DuoAttention)
  const std::int64_t seq = c.add_sequence();
  const seq_kv s = make_seq(200, 2, 4, 4, rng, dtype::f32);
  for (std::int64_t t = 0; t < 200; ++t) append_range(c, seq, s, t, t + 1, 1);
  const std::vector<std::int64_t> kept = c.cached_tokens(seq, 0);
  // Before the last append (length 199): tokens < 2 and > 199 - 6, then token 199.
  EXPECT_EQ(kept, (std::vector<std::int64_t>{0, 1, 194, 195, 196, 197, 198, 199}));
  EXPECT_EQ(c.cached(seq, 1), 200);
  // Head 0 holds a sink page and at most three window pages; head 1 all 50.
  EXPECT_LE(c.memory().pages_in_use, 50 + 4);
}

TEST(KvCache, TruncateAndKeepTopK) {
  std::mt19937_64 rng(4);
  kv_cache c({1, 3, 3, 5, dtype::f32, std::nullopt});
  const std::int64_t seq = c.add_sequence();
  const seq_kv s = make_seq(23, 1, 3, 3, rng, dtype::f32);
  append_range(c, seq, s, 0, 23, 23);
  ASSERT_TRUE(c.truncate(seq, 12).ok());
  EXPECT_EQ(c.length(seq), 12);
  EXPECT_EQ(c.cached(seq, 0), 12);
  append_range(c, seq, s, 12, 23, 4);  // re-append after the rollback
  EXPECT_EQ(c.cached(seq, 0), 23);
  std::vector<float> mass(23);
  for (int i = 0; i < 23; ++i) mass[i] = static_cast<float>((i * 7) % 23);
  ASSERT_TRUE(c.keep_top_k(seq, 0, mass, 5).ok());
  // The five largest masses i * 7 % 23 = 22, 21, 20, 19, 18 are at slots 13, 3, 16, 6, 19 (7^-1 = 10 mod 23).
  EXPECT_EQ(c.cached_tokens(seq, 0), (std::vector<std::int64_t>{3, 6, 13, 16, 19}));
  std::vector<float> k, v;
  ASSERT_TRUE(c.read(seq, 0, k, v).ok());
  EXPECT_EQ(k[0], s.k[3 * 3]);
  EXPECT_EQ(c.memory().pages_in_use, 1);
}

TEST(KvCache, BadArgumentsGetClearErrors) {
  EXPECT_THROW(kv_cache({0, 4, 4, 16, dtype::f32, std::nullopt}), std::invalid_argument);
  EXPECT_NE(kv_cache::validate({2, 4, 4, 0, dtype::f32, std::nullopt}).error.find("page_size 0"), std::string::npos);
  EXPECT_NE(kv_cache::validate({2, 4, 4, 16, dtype::f64, std::nullopt}).error.find("storage f64"), std::string::npos);
  kv_cache c({2, 4, 4, 16, dtype::f32, std::nullopt});
  const std::int64_t seq = c.add_sequence();
  std::vector<float> k(64);
  EXPECT_NE(c.append(seq, make_bshd(k.data(), dtype::f32, 1, 2, 3, 4), make_bshd(k.data(), dtype::f32, 1, 2, 3, 4)).error.find("k.heads 3 != cache heads_kv 2"),
            std::string::npos);
  EXPECT_NE(c.append(7, make_bshd(k.data(), dtype::f32, 1, 2, 2, 4), make_bshd(k.data(), dtype::f32, 1, 2, 2, 4)).error.find("sequence 7 does not exist"),
            std::string::npos);
  EXPECT_NE(c.truncate(seq, 3).error.find("length 3"), std::string::npos);
  EXPECT_NE(c.set_eviction(2, {}).error.find("kv_head 2"), std::string::npos);
  ASSERT_TRUE(c.append(seq, make_bshd(k.data(), dtype::f32, 1, 2, 2, 4), make_bshd(k.data(), dtype::f32, 1, 2, 2, 4)).ok());
  // Decode: q longer than the sequence, wrong dims, repeated ids; the output stays untouched.
  std::vector<float> q(3 * 4 * 4);
  const decode_out r1 = run_decode(c, {seq}, q, 3, 4, {}, backend::automatic);
  EXPECT_NE(r1.st.error.find("[attention_decode] q.seq 3 > length 2 of sequence 0"), std::string::npos) << r1.st.error;
  EXPECT_EQ(r1.out[0], 12345.0f);
  const decode_out r2 = run_decode(c, {seq}, q, 1, 3, {}, backend::automatic);
  EXPECT_NE(r2.st.error.find("q.heads 3 is not a multiple of the cache's heads_kv 2"), std::string::npos) << r2.st.error;
  std::vector<float> q2(2 * 4 * 4);
  const decode_out r3 = run_decode(c, {seq, seq}, q2, 1, 4, {}, backend::automatic);
  EXPECT_NE(r3.st.error.find("must be distinct"), std::string::npos) << r3.st.error;
  spec roped;
  rope_spec rs;
  roped.rope = &rs;
  const decode_out r4 = run_decode(c, {seq}, q, 1, 4, roped, backend::automatic);
  EXPECT_NE(r4.st.error.find("keys without RoPE"), std::string::npos) << r4.st.error;
}

// The decode oracle on the cache equals the forward oracle on the full sequence (the contract of kv_cache.h), for
// every page size, chunked appends and every spec variant.
TEST(Decode, OracleMatchesFullSequenceForward) {
  std::mt19937_64 rng(5);
  const std::int64_t hq = 4, hkv = 2, d = 6, dv = 5, L = 37;
  for (std::int64_t page : {1, 5, 16}) {
    kv_cache c({hkv, d, dv, page, dtype::f32, std::nullopt});
    const std::int64_t seq = c.add_sequence();
    const seq_kv s = make_seq(L, hkv, d, dv, rng, dtype::f32);
    append_range(c, seq, s, 0, L, 11);
    for (std::int64_t lq : {1, 4}) {
      for (auto [name, sp] : spec_variants(hq, L)) {
        const std::vector<float> sinks = sink_values(hq);
        if (name == "full") sp.sink_logits = sinks.data();
        const std::vector<float> q = random_values(lq * hq * d, rng, dtype::f32);
        const decode_out got = run_decode(c, {seq}, q, lq, hq, sp, backend::reference);
        const decode_out want = full_sequence_rows(s, q, lq, hq, hkv, d, dv, sp, rng);
        EXPECT_TRUE(oracles_agree(got, want, name + " page " + std::to_string(page) + " lq " + std::to_string(lq)));
      }
    }
  }
}

// Streaming eviction is exact: on a cache that evicted under {sinks, window}, the mask sinks | window gives what the
// full sequence gives with that mask.
TEST(Decode, EvictedCacheMatchesFullSequenceUnderItsMask) {
  std::mt19937_64 rng(6);
  const std::int64_t hq = 4, hkv = 2, d = 8, L = 90, sinks = 4, window = 16;
  for (std::int64_t page : {4, 16}) {
    kv_cache c({hkv, d, d, page, dtype::f32, std::nullopt});
    ASSERT_TRUE(c.set_eviction(-1, {sinks, window}).ok());
    const std::int64_t seq = c.add_sequence();
    const seq_kv s = make_seq(L, hkv, d, d, rng, dtype::f32);
    append_range(c, seq, s, 0, L - 3, 5);
    append_range(c, seq, s, L - 3, L, 3);  // the last three tokens: a block of queries
    EXPECT_LT(c.cached(seq, 0), sinks + window + 8);
    spec sp;
    sp.mask = mask_expr::causal(causal_mode::bottom_right) &
              (mask_expr::window(window - 1, 0, causal_mode::bottom_right) | mask_expr::sinks(sinks));
    const std::vector<float> q = random_values(3 * hq * d, rng, dtype::f32);
    const decode_out want = full_sequence_rows(s, q, 3, hq, hkv, d, d, sp, rng);
    EXPECT_TRUE(oracles_agree(run_decode(c, {seq}, q, 3, hq, sp, backend::reference), want, "oracle"));
    EXPECT_TRUE(decode_close(run_decode(c, {seq}, q, 3, hq, sp, backend::cpu), want, "kernel page " + std::to_string(page)));
  }
}

// The kernel against the oracle: seeded cases over page sizes (in place and gathered), storage dtypes, GQA ratios,
// head dims that are not a multiple of the vector width, query counts up to two row tiles, several sequences of
// different lengths in one batch, evicted slots and every spec variant; on every compiled target.
TEST(Decode, KernelMatchesOracleSweep) {
  std::mt19937_64 rng(7);
  struct shape {
    std::int64_t page, hq, hkv, d, dv, lq;
    dtype storage;
  };
  const shape shapes[] = {{16, 8, 2, 64, 64, 1, dtype::f32}, {7, 4, 4, 13, 7, 3, dtype::bf16}, {32, 6, 2, 130, 96, 5, dtype::f16},
                          {1, 3, 1, 1, 1, 1, dtype::f32},     {64, 8, 1, 32, 16, 9, dtype::bf16}, {80, 2, 1, 16, 48, 1, dtype::f32},
                          {16, 16, 2, 8, 8, 70, dtype::f32}};
  for_each_target("Decode.KernelMatchesOracleSweep", [&](const char* target) {
    for (const shape& sh : shapes) {
      kv_cache c({sh.hkv, sh.d, sh.dv, sh.page, sh.storage, std::nullopt});
      if (sh.page == 7) ASSERT_TRUE(c.set_eviction(1, {2, 11}).ok());
      std::vector<std::int64_t> seqs;
      const std::int64_t lens[] = {sh.lq + 190, sh.lq, sh.lq + 63};
      for (std::int64_t len : lens) {
        const std::int64_t seq = c.add_sequence();
        const seq_kv s = make_seq(len, sh.hkv, sh.d, sh.dv, rng, sh.storage);
        append_range(c, seq, s, 0, len - sh.lq, 29);
        append_range(c, seq, s, len - sh.lq, len, sh.lq);
        seqs.push_back(seq);
      }
      for (auto [name, sp] : spec_variants(sh.hq, sh.lq + 190)) {
        const std::vector<float> sinks = sink_values(sh.hq);
        if (name == "causal") sp.sink_logits = sinks.data();
        const std::vector<float> q = random_values(3 * sh.lq * sh.hq * sh.d, rng, dtype::f32);
        const std::string what = std::string(target) + " " + name + " page " + std::to_string(sh.page) + " d " +
                                 std::to_string(sh.d) + " lq " + std::to_string(sh.lq) + " " + dtype_name(sh.storage);
        EXPECT_TRUE(decode_close(run_decode(c, seqs, q, sh.lq, sh.hq, sp, backend::cpu),
                                 run_decode(c, seqs, q, sh.lq, sh.hq, sp, backend::reference), what));
      }
    }
  });
}

TEST(Decode, SharedPrefixRunsAsCascadeAndMatchesSeparateCalls) {
  std::mt19937_64 rng(8);
  const std::int64_t hq = 8, hkv = 2, d = 32, prompt = 300;
  kv_cache c({hkv, d, d, 16, dtype::f32, std::nullopt});
  const std::int64_t root = c.add_sequence();
  const seq_kv s = make_seq(prompt, hkv, d, d, rng, dtype::f32);
  append_range(c, root, s, 0, prompt, 100);
  std::vector<std::int64_t> seqs = {root};
  for (int f = 0; f < 3; ++f) {
    std::int64_t child = -1;
    ASSERT_TRUE(c.fork(root, child).ok());
    seqs.push_back(child);
  }
  for (std::size_t x = 0; x < seqs.size(); ++x) {
    const seq_kv own = make_seq(static_cast<std::int64_t>(5 + x), hkv, d, d, rng, dtype::f32);
    append_range(c, seqs[x], own, 0, own.len, 1);
  }
  spec sp;
  sp.causal = causal_mode::bottom_right;
  const std::vector<float> q = random_values(4 * hq * d, rng, dtype::f32);
  const decode_out batch = run_decode(c, seqs, q, 1, hq, sp, backend::cpu, 2);
  const decode_out oracle = run_decode(c, seqs, q, 1, hq, sp, backend::reference);
  EXPECT_TRUE(decode_close(batch, oracle, "cascade batch"));
  for (std::size_t x = 0; x < seqs.size(); ++x) {
    const std::vector<float> qx(q.begin() + static_cast<std::ptrdiff_t>(x * hq * d), q.begin() + static_cast<std::ptrdiff_t>((x + 1) * hq * d));
    const decode_out one = run_decode(c, {seqs[x]}, qx, 1, hq, sp, backend::cpu, 2);
    decode_out part;
    part.out.assign(batch.out.begin() + static_cast<std::ptrdiff_t>(x * hq * d), batch.out.begin() + static_cast<std::ptrdiff_t>((x + 1) * hq * d));
    part.lse.assign(batch.lse.begin() + static_cast<std::ptrdiff_t>(x * hq), batch.lse.begin() + static_cast<std::ptrdiff_t>((x + 1) * hq));
    EXPECT_TRUE(decode_close(part, one, "sequence " + std::to_string(x)));
  }
  // The plan reads the shared prompt pages once for all four sequences.
  attn_decode_params p;
  tensor qt = make_bshd(const_cast<float*>(q.data()), dtype::f32, 4, 1, hq, d);
  std::vector<float> out(4 * hq * d);
  ASSERT_TRUE(make_decode_params(qt, c, seqs, make_bshd(out.data(), dtype::f32, 4, 1, hq, d), sp, {}, p).ok());
  const decode_selection sel = select_decode(p, backend::cpu);
  std::string reasons;
  for (const std::string& r : sel.reasons) reasons += r + "\n";
  EXPECT_NE(reasons.find("cascade: 2 shared-prefix range(s)"), std::string::npos) << reasons;
}

TEST(Decode, BitwiseIdenticalForOneAndTwoThreads) {
  std::mt19937_64 rng(9);
  kv_cache c({2, 64, 64, 16, dtype::bf16, std::nullopt});
  const std::int64_t seq = c.add_sequence();
  const seq_kv s = make_seq(5000, 2, 64, 64, rng, dtype::bf16);
  append_range(c, seq, s, 0, 5000, 1000);
  spec sp;
  sp.causal = causal_mode::bottom_right;
  const std::vector<float> q = random_values(8 * 64, rng, dtype::f32);
  const decode_out one = run_decode(c, {seq}, q, 1, 8, sp, backend::cpu, 1);
  const decode_out two = run_decode(c, {seq}, q, 1, 8, sp, backend::cpu, 2);
  ASSERT_TRUE(one.st.ok()) << one.st.error;
  EXPECT_TRUE(bytes_equal(one.out, two.out));
  EXPECT_TRUE(bytes_equal(one.lse, two.lse));
  EXPECT_TRUE(decode_close(one, run_decode(c, {seq}, q, 1, 8, sp, backend::reference), "split-K"));
}

TEST(Decode, KeyMassMatchesOracleAndDrivesTopKRecycling) {
  std::mt19937_64 rng(10);
  for (std::int64_t page : {16, 7}) {
    kv_cache c({2, 16, 16, page, dtype::f32, std::nullopt});
    const std::int64_t a = c.add_sequence(), b = c.add_sequence();
    const seq_kv sa = make_seq(150, 2, 16, 16, rng, dtype::f32), sb = make_seq(40, 2, 16, 16, rng, dtype::f32);
    append_range(c, a, sa, 0, 150, 50);
    append_range(c, b, sb, 0, 40, 40);
    spec sp;
    sp.causal = causal_mode::bottom_right;
    const std::vector<float> q = random_values(2 * 2 * 4 * 16, rng, dtype::f32);
    const std::int64_t slots = 160;
    std::vector<float> mk(2 * 2 * slots, -1.0f), mr(2 * 2 * slots, -1.0f);
    const decode_out k = run_decode(c, {a, b}, q, 2, 4, sp, backend::cpu, 2, mk.data(), slots);
    const decode_out r = run_decode(c, {a, b}, q, 2, 4, sp, backend::reference, 0, mr.data(), slots);
    ASSERT_TRUE(decode_close(k, r, "with key mass"));
    double total = 0.0;
    for (std::size_t i = 0; i < mk.size(); ++i) {
      EXPECT_NEAR(mk[i], mr[i], 1e-5) << "page " << page << " slot " << i;
      total += mk[i];
    }
    EXPECT_NEAR(total, 2.0 * 2 * 4, 1e-4);  // every row's probabilities sum to 1
    // Recycled Attention: keep the 32 most-attended keys of each head of a, then decode on them.
    for (std::int64_t h = 0; h < 2; ++h)
      ASSERT_TRUE(c.keep_top_k(a, h, std::span<const float>(mk.data() + h * slots, 150), 32).ok());
    EXPECT_EQ(c.cached(a, 0), 32);
    EXPECT_TRUE(decode_close(run_decode(c, {a, b}, q, 2, 4, sp, backend::cpu), run_decode(c, {a, b}, q, 2, 4, sp, backend::reference),
                             "after keep_top_k page " + std::to_string(page)));
  }
}

TEST(Decode, RowsWithEveryKeyEvictedGiveZeroAndMinusInfinity) {
  std::mt19937_64 rng(11);
  kv_cache c({1, 8, 8, 16, dtype::f32, std::nullopt});
  const std::int64_t seq = c.add_sequence(), empty = c.add_sequence();
  const seq_kv s = make_seq(40, 1, 8, 8, rng, dtype::f32);
  append_range(c, seq, s, 0, 40, 40);
  append_range(c, empty, s, 0, 1, 1);
  std::vector<float> mass(40, 1.0f);
  ASSERT_TRUE(c.keep_top_k(empty, 0, std::span<const float>(mass.data(), 1), 0).ok());  // nothing left
  spec sp;
  sp.mask = mask_expr::sinks(0) | mask_expr::window(2, 0, causal_mode::bottom_right);
  ASSERT_TRUE(c.keep_top_k(seq, 0, std::span<const float>(mass.data(), 40), 10).ok());  // keeps tokens 0 .. 9
  const std::vector<float> q = random_values(2 * 2 * 8, rng, dtype::f32);
  for (backend b : {backend::cpu, backend::reference}) {
    const decode_out r = run_decode(c, {seq, empty}, q, 1, 2, sp, b);
    ASSERT_TRUE(r.st.ok()) << r.st.error;
    for (float x : r.out) EXPECT_EQ(x, 0.0f);
    for (float x : r.lse) EXPECT_EQ(x, neg_inf);
    const std::vector<float> sinks = {0.25f, -1.0f};
    spec with_sink = sp;
    with_sink.sink_logits = sinks.data();
    const decode_out rs = run_decode(c, {seq, empty}, q, 1, 2, with_sink, b);
    for (float x : rs.out) EXPECT_EQ(x, 0.0f);
    EXPECT_EQ(rs.lse[0], 0.25f);
    EXPECT_EQ(rs.lse[1], -1.0f);
  }
}

// EasyControl / ViD-GPT style: condition tokens cached once; each denoising step appends the current block, attends
// (bidirectionally inside the block, to the whole condition: block_causal), then rolls back to the condition.
TEST(Decode, ConditionTokensReusedAcrossStepsWithTruncate) {
  std::mt19937_64 rng(13);
  const std::int64_t hq = 4, hkv = 2, d = 16, cond = 24, block = 8;
  kv_cache c({hkv, d, d, 16, dtype::f32, std::nullopt});
  const std::int64_t seq = c.add_sequence();
  const seq_kv condition = make_seq(cond, hkv, d, d, rng, dtype::f32);
  append_range(c, seq, condition, 0, cond, cond);
  const std::int64_t pages = c.memory().pages_in_use;
  spec sp;
  sp.mask = mask_expr::block_causal(block);
  for (int step = 0; step < 3; ++step) {
    seq_kv full = make_seq(cond + block, hkv, d, d, rng, dtype::f32);
    std::copy(condition.k.begin(), condition.k.end(), full.k.begin());
    std::copy(condition.v.begin(), condition.v.end(), full.v.begin());
    append_range(c, seq, full, cond, cond + block, block);
    const std::vector<float> q = random_values(block * hq * d, rng, dtype::f32);
    const decode_out want = full_sequence_rows(full, q, block, hq, hkv, d, d, sp, rng);
    EXPECT_TRUE(oracles_agree(run_decode(c, {seq}, q, block, hq, sp, backend::reference), want, "oracle step " + std::to_string(step)));
    EXPECT_TRUE(decode_close(run_decode(c, {seq}, q, block, hq, sp, backend::cpu), want, "kernel step " + std::to_string(step)));
    ASSERT_TRUE(c.truncate(seq, cond).ok());
    EXPECT_EQ(c.memory().pages_in_use, pages);
  }
}

// Continuous batching: one call mixes a prefill chunk, single decode tokens and a sequence with no new query
// (options.cu_seqlens_q); each sequence's rows equal its own fixed-length call.
TEST(Decode, RaggedBatchMatchesPerSequenceCalls) {
  std::mt19937_64 rng(14);
  const std::int64_t hq = 6, hkv = 2, d = 24;
  rope_spec rs;
  kv_cache c({hkv, d, d, 16, dtype::bf16, rs});
  const std::vector<std::int64_t> lens = {90, 17, 40, 5}, news = {9, 1, 0, 5};
  std::vector<std::int64_t> seqs, cu = {0};
  for (std::size_t x = 0; x < lens.size(); ++x) {
    seqs.push_back(c.add_sequence());
    const seq_kv s = make_seq(lens[x], hkv, d, d, rng, dtype::bf16);
    append_range(c, seqs.back(), s, 0, lens[x], 13);
    cu.push_back(cu.back() + news[x]);
  }
  const std::int64_t total = cu.back();
  for (auto [name, sp] : spec_variants(hq, 90)) {
    sp.rope = &rs;
    const std::vector<float> q = random_values(total * hq * d, rng, dtype::f32);
    for (backend b : {backend::cpu, backend::reference}) {
      std::vector<float> out(static_cast<std::size_t>(total * hq * d), 7.0f), lse(static_cast<std::size_t>(hq * total), 7.0f);
      const lse_tensor lt = make_lse(lse.data(), hq, total);
      decode_options o;
      o.use = b;
      o.lse = &lt;
      o.cu_seqlens_q = cu.data();
      const status st = attention_decode(make_bshd(const_cast<float*>(q.data()), dtype::f32, 1, total, hq, d), c, seqs,
                                         make_bshd(out.data(), dtype::f32, 1, total, hq, d), sp, o);
      ASSERT_TRUE(st.ok()) << st.error;
      for (std::size_t x = 0; x < seqs.size(); ++x) {
        if (news[x] == 0) continue;
        const std::vector<float> qx(q.begin() + cu[x] * hq * d, q.begin() + cu[x + 1] * hq * d);
        const decode_out one = run_decode(c, {seqs[x]}, qx, news[x], hq, sp, backend::reference);
        decode_out part;
        part.out.assign(out.begin() + cu[x] * hq * d, out.begin() + cu[x + 1] * hq * d);
        for (std::int64_t h = 0; h < hq; ++h)
          for (std::int64_t i = cu[x]; i < cu[x + 1]; ++i) part.lse.push_back(lse[static_cast<std::size_t>(h * total + i)]);
        EXPECT_TRUE(decode_close(part, one, name + " " + backend_name(b) + " sequence " + std::to_string(x)));
      }
    }
  }
  // The offsets' rules.
  std::vector<float> q(static_cast<std::size_t>(total * hq * d)), out(q.size());
  decode_options o;
  std::vector<std::int64_t> bad = {0, 9, 10, 9, 15};
  o.cu_seqlens_q = bad.data();
  spec sp;
  sp.rope = &rs;
  const status st = attention_decode(make_bshd(q.data(), dtype::f32, 1, total, hq, d), c, seqs, make_bshd(out.data(), dtype::f32, 1, total, hq, d), sp, o);
  EXPECT_NE(st.error.find("[attention_decode] options.cu_seqlens_q decreases at 3"), std::string::npos) << st.error;
  bad = {0, 9, 10, 10, 14};
  const status st2 = attention_decode(make_bshd(q.data(), dtype::f32, 1, total, hq, d), c, seqs, make_bshd(out.data(), dtype::f32, 1, total, hq, d), sp, o);
  EXPECT_NE(st2.error.find("cu_seqlens_q[4] 14 != q.seq 15"), std::string::npos) << st2.error;
  bad = {0, 9, 28, 28, 15};
  const status st3 = attention_decode(make_bshd(q.data(), dtype::f32, 1, total, hq, d), c, seqs, make_bshd(out.data(), dtype::f32, 1, total, hq, d), sp, o);
  EXPECT_NE(st3.error.find("decreases at 4"), std::string::npos) << st3.error;
  for (float x : out) EXPECT_EQ(x, 0.0f);  // untouched
}

TEST(Decode, RopeKeysRotatedOnAppendMatchTheFullSequence) {
  std::mt19937_64 rng(12);
  const std::int64_t hq = 4, hkv = 2, d = 16, L = 50;
  rope_spec rs;
  rs.theta = 500.0;
  rs.rotary_dim = 12;
  kv_cache c({hkv, d, d, 16, dtype::f32, rs});
  const std::int64_t seq = c.add_sequence();
  const seq_kv s = make_seq(L, hkv, d, d, rng, dtype::f32);
  append_range(c, seq, s, 0, L, 7);
  spec sp;
  sp.causal = causal_mode::bottom_right;
  sp.rope = &rs;
  const std::vector<float> q = random_values(2 * hq * d, rng, dtype::f32);
  const decode_out want = full_sequence_rows(s, q, 2, hq, hkv, d, d, sp, rng);
  EXPECT_TRUE(decode_close(run_decode(c, {seq}, q, 2, hq, sp, backend::reference), want, "oracle (keys rotated in f32)"));
  EXPECT_TRUE(decode_close(run_decode(c, {seq}, q, 2, hq, sp, backend::cpu), want, "kernel"));
}

}  // namespace
}  // namespace omniattn::test
