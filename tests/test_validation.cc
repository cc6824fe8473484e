// Every validation rule of src/core/validate.cc: the call is rejected, the message starts with "[attention]" and names
// the argument, and nothing is written: the output (and LSE) buffers, and the inputs, are unchanged byte for byte.
#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/score_kinds.h"
#include "omniattn/omniattn.h"

namespace omniattn {
namespace {

constexpr std::int64_t B = 2, LQ = 5, LK = 7, HQ = 4, HKV = 2, D = 8, DV = 6;
constexpr std::size_t k_slack = 4096;  // every buffer is oversized so a wrongly accepted call cannot write out of bounds
constexpr std::uint8_t k_sentinel = 0xa5;

// One attention call over caller-owned buffers, valid as constructed; tests break one rule at a time.
// Not copyable: options and spec point into it.
struct call {
  std::vector<float> qb, kb, vb, ob, lb;
  std::vector<float> xb = std::vector<float>(k_slack);  // room for the spec's own input buffers (aliasing tests)
  tensor q, k, v, out;
  lse_tensor l;
  spec s;
  options o;
  varlen vl;
  std::vector<std::int64_t> cu_q, cu_k;
  block_mask bm;

  // packed: a varlen call (two sequences 4:5 and 5:7), else a fixed-length [B, LQ/LK] batch.
  explicit call(bool packed = false)
      : qb(B * LQ * HQ * D + k_slack), kb(B * LK * HKV * D + k_slack), vb(B * LK * HKV * DV + k_slack),
        ob(B * LQ * HQ * DV + k_slack), lb(B * HQ * LQ + k_slack) {
    std::mt19937_64 rng(7);
    std::uniform_real_distribution<float> u(-1, 1);
    for (auto* buf : {&qb, &kb, &vb})
      for (float& x : *buf) x = u(rng);
    std::memset(ob.data(), k_sentinel, ob.size() * sizeof(float));
    std::memset(lb.data(), k_sentinel, lb.size() * sizeof(float));
    if (packed) {
      cu_q = {0, 4, 9};
      cu_k = {0, 5, 12};
      vl = {cu_q.data(), cu_k.data(), 2};
      q = make_bshd(qb.data(), dtype::f32, 1, 9, HQ, D);
      k = make_bshd(kb.data(), dtype::f32, 1, 12, HKV, D);
      v = make_bshd(vb.data(), dtype::f32, 1, 12, HKV, DV);
      out = make_bshd(ob.data(), dtype::f32, 1, 9, HQ, DV);
      l = make_lse(lb.data(), HQ, 9);
      o.packed = &vl;
    } else {
      q = make_bshd(qb.data(), dtype::f32, B, LQ, HQ, D);
      k = make_bshd(kb.data(), dtype::f32, B, LK, HKV, D);
      v = make_bshd(vb.data(), dtype::f32, B, LK, HKV, DV);
      out = make_bshd(ob.data(), dtype::f32, B, LQ, HQ, DV);
      l = make_lse(lb.data(), HQ, LQ);
    }
    o.lse = &l;
    o.use = backend::reference;
    o.threads = 1;
  }
  call(const call&) = delete;
  call& operator=(const call&) = delete;

  // A valid block mask for the fixed-length call: tiles 2 x 4 -> 3 x 2 tiles, broadcast over batch and heads.
  void add_block_mask() {
    bm.q_tile = 2;
    bm.kv_tile = 4;
    bm.batch = 1;
    bm.heads = 1;
    bm.q_tiles = 3;
    bm.kv_tiles = 2;
    bm.kinds.assign(6, tile_kind::partial);
    s.blocks = &bm;
  }

  // Makes q, k, v, out bf16 views over the same buffers (sizes unchanged), refilling the inputs with bf16 values.
  void to_bf16() {
    std::mt19937_64 rng(8);
    std::uniform_real_distribution<float> u(-1, 1);
    for (auto* buf : {&qb, &kb, &vb}) {
      auto* h = reinterpret_cast<std::uint16_t*>(buf->data());
      for (std::size_t n = 0; n < 2 * buf->size(); ++n) h[n] = f32_to_bf16(u(rng));
    }
    for (tensor* t : {&q, &k, &v, &out}) *t = make_bshd(t->data, dtype::bf16, t->batch, t->seq, t->heads, t->dim);
  }

  std::vector<std::uint8_t> snapshot() const {
    std::vector<std::uint8_t> all;
    for (const auto* buf : {&qb, &kb, &vb, &ob, &lb}) {
      const auto* p = reinterpret_cast<const std::uint8_t*>(buf->data());
      all.insert(all.end(), p, p + buf->size() * sizeof(float));
    }
    return all;
  }
};

bool all_sentinel(const std::vector<float>& buf) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(buf.data());
  for (std::size_t n = 0; n < buf.size() * sizeof(float); ++n)
    if (p[n] != k_sentinel) return false;
  return true;
}

// The call after `mutate` must be rejected by attention() and make_params() with a message that starts with
// "[attention]" and contains `needle`, and must not write a byte anywhere.
void expect_rejected(const std::function<void(call&)>& mutate, const std::string& needle, bool packed = false) {
  SCOPED_TRACE(needle);
  call c(packed);
  mutate(c);
  const std::vector<std::uint8_t> before = c.snapshot();
  const status st = attention(c.q, c.k, c.v, c.out, c.s, c.o);
  EXPECT_FALSE(st.ok());
  EXPECT_FALSE(static_cast<bool>(st));
  EXPECT_EQ(st.error.rfind("[attention] ", 0), 0u) << st.error;
  EXPECT_NE(st.error.find(needle), std::string::npos) << "message: " << st.error;
  EXPECT_TRUE(c.snapshot() == before) << "a rejected call wrote to memory";
  EXPECT_TRUE(all_sentinel(c.ob)) << "output written";
  EXPECT_TRUE(all_sentinel(c.lb)) << "lse written";
  // make_params reports the same rule and leaves the params struct alone.
  attn_params p;
  p.batch = 12345;
  p.out = &p;
  const status sp = make_params(c.q, c.k, c.v, c.out, c.s, c.o, p);
  EXPECT_EQ(sp.error, st.error);
  EXPECT_EQ(p.batch, 12345);
  EXPECT_EQ(p.out, static_cast<void*>(&p));
  // Every backend validates the same way (unless the rule broken is the backend itself).
  if (c.o.use == backend::reference) {
    for (backend b : {backend::automatic, backend::cpu}) {
      c.o.use = b;
      const status sb = attention(c.q, c.k, c.v, c.out, c.s, c.o);
      EXPECT_FALSE(sb.ok());
      EXPECT_NE(sb.error.find(needle), std::string::npos) << backend_name(b) << ": " << sb.error;
    }
  }
  EXPECT_TRUE(c.snapshot() == before) << "a rejected call wrote to memory";
}

void expect_accepted(const std::function<void(call&)>& mutate, bool packed = false) {
  for (backend b : {backend::reference, backend::cpu, backend::automatic}) {
    call c(packed);
    mutate(c);
    c.o.use = b;
    const status st = attention(c.q, c.k, c.v, c.out, c.s, c.o);
    EXPECT_TRUE(st.ok()) << backend_name(b) << ": " << st.error;
    if (c.out.data == c.ob.data()) EXPECT_FALSE(all_sentinel(c.ob)) << backend_name(b) << ": the output was not written";
  }
}

tensor& pick(call& c, int which) { return which == 0 ? c.q : which == 1 ? c.k : which == 2 ? c.v : c.out; }
const char* const k_names[4] = {"q", "k", "v", "out"};

// ------------------------------------------------------------------------------------------------------------------

TEST(Validation, ValidCallsSucceed) {
  expect_accepted([](call&) {});
  expect_accepted([](call&) {}, /*packed=*/true);
  expect_accepted([](call& c) { c.o.lse = nullptr; });
  expect_accepted([](call& c) { c.add_block_mask(); });
  expect_accepted([](call& c) { c.to_bf16(); });
  expect_accepted([](call& c) {  // bf16 inputs, f32 output
    c.to_bf16();
    c.out.type = dtype::f32;
  });
  expect_accepted([](call& c) {  // inputs may broadcast with stride 0
    c.k.stride_batch = 0;
    c.v.stride_batch = 0;
  });
  expect_accepted([](call& c) { c.o.threads = 0; });
  expect_accepted([](call& c) { c.s.scale = 0.0; });
}

TEST(Validation, NullPointers) {
  for (int t = 0; t < 4; ++t)
    expect_rejected([t](call& c) { pick(c, t).data = nullptr; }, std::string(k_names[t]) + ".data is null");
}

TEST(Validation, UnknownDtype) {
  for (int t = 0; t < 4; ++t)
    expect_rejected([t](call& c) { pick(c, t).type = static_cast<dtype>(9); }, std::string(k_names[t]) + ".type 9 is not a known dtype");
}

TEST(Validation, NegativeSizes) {
  // batch, seq and heads may be 0 (an empty call, tests/test_robustness.cc); dim must be > 0.
  const char* const dims[4] = {"batch", "seq", "heads", "dim"};
  for (int t = 0; t < 4; ++t)
    for (int d = 0; d < 4; ++d)
      for (std::int64_t bad : {std::int64_t{-3}, std::numeric_limits<std::int64_t>::min()}) {
        expect_rejected(
            [t, d, bad](call& c) {
              tensor& x = pick(c, t);
              std::int64_t* f[4] = {&x.batch, &x.seq, &x.heads, &x.dim};
              *f[d] = bad;
            },
            std::string(k_names[t]) + "." + dims[d] + " " + std::to_string(bad) + (d == 3 ? " must be > 0" : " must be >= 0"));
      }
  for (int t = 0; t < 4; ++t)
    expect_rejected([t](call& c) { pick(c, t).dim = 0; }, std::string(k_names[t]) + ".dim 0 must be > 0");
  // An empty tensor needs no storage (torch gives empty tensors a null data pointer); a non-empty one does.
  expect_rejected([](call& c) { c.k.heads = c.v.heads = 0; }, "q.heads 4 is not a multiple of k.heads 0");
}

TEST(Validation, ShapeMismatches) {
  expect_rejected([](call& c) { c.k = make_bshd(c.kb.data(), dtype::f32, B, LK, HKV, 4); }, "k.dim 4 != q.dim 8");
  expect_rejected([](call& c) { c.k = make_bshd(c.kb.data(), dtype::f32, 1, LK, HKV, D); }, "k.batch 1 != q.batch 2");
  expect_rejected([](call& c) { c.v = make_bshd(c.vb.data(), dtype::f32, 1, LK, HKV, DV); }, "v.batch 1 != k.batch 2");
  expect_rejected([](call& c) { c.v = make_bshd(c.vb.data(), dtype::f32, B, LK - 1, HKV, DV); }, "v.seq 6 != k.seq 7");
  expect_rejected([](call& c) { c.v = make_bshd(c.vb.data(), dtype::f32, B, LK, 1, DV); }, "v.heads 1 != k.heads 2");
  expect_rejected(
      [](call& c) {
        c.q = make_bshd(c.qb.data(), dtype::f32, B, LQ, 3, D);
        c.out = make_bshd(c.ob.data(), dtype::f32, B, LQ, 3, DV);
      },
      "q.heads 3 is not a multiple of k.heads 2");
  expect_rejected([](call& c) { c.out = make_bshd(c.ob.data(), dtype::f32, 1, LQ, HQ, DV); }, "out.batch 1 != q.batch 2");
  expect_rejected([](call& c) { c.out = make_bshd(c.ob.data(), dtype::f32, B, LQ - 1, HQ, DV); }, "out.seq 4 != q.seq 5");
  expect_rejected([](call& c) { c.out = make_bshd(c.ob.data(), dtype::f32, B, LQ, 2, DV); }, "out.heads 2 != q.heads 4");
  expect_rejected([](call& c) { c.out = make_bshd(c.ob.data(), dtype::f32, B, LQ, HQ, D); }, "out.dim 8 != v.dim 6");
}

TEST(Validation, DtypeMismatches) {
  expect_rejected([](call& c) { c.k.type = dtype::bf16; }, "k.type bf16 != q.type f32");
  expect_rejected([](call& c) { c.v.type = dtype::f16; }, "v.type f16 != q.type f32");
  expect_rejected([](call& c) { c.out.type = dtype::bf16; }, "out.type bf16 must be q.type f32 or f32");
  expect_rejected(
      [](call& c) {
        c.to_bf16();
        c.out.type = dtype::f16;
      },
      "out.type f16 must be q.type bf16 or f32");
  expect_rejected(
      [](call& c) {
        c.to_bf16();
        c.q.type = dtype::f16;
        c.out.type = dtype::f16;
      },
      "k.type bf16 != q.type f16");
}

TEST(Validation, NegativeStrides) {
  // Accepted (numpy's x[::-1]): data points at element [0, 0, 0, 0], the view extends below it. Values are checked in
  // test_robustness.cc; here the byte ranges: overlap and address-space rules see the part below the pointer.
  expect_accepted([](call& c) {
    c.q.data = c.qb.data() + (LQ - 1) * HQ * D;
    c.q.stride_seq = -HQ * D;
  });
  expect_rejected(
      [](call& c) {
        c.q.data = c.ob.data() + B * LQ * HQ * DV - 1 + (LQ - 1) * HQ * D;  // reaches back into out by one element
        c.q.stride_seq = -HQ * D;
      },
      "out aliases q");
  expect_rejected([](call& c) { c.out.stride_head = -3; }, "out.stride_head -3 makes the output overlap itself (needs |stride| >= 6)");
  expect_rejected([](call& c) { c.k.data = reinterpret_cast<void*>(std::uintptr_t{64}); c.k.stride_seq = -HKV * D; },
                  "k extends below the start of the address space (negative strides)");
  expect_rejected([](call& c) { c.v.stride_seq = std::numeric_limits<std::int64_t>::min() / 2; }, "v strides overflow int64 addressing");
  expect_rejected([](call& c) { c.l.stride_seq = std::numeric_limits<std::int64_t>::min(); }, "lse strides overflow int64 addressing");
  // A size-1 dim may have any stride, also INT64_MIN.
  expect_accepted([](call& c) {
    c.q = make_bshd(c.qb.data(), dtype::f32, B, LQ, 1, D);
    c.k = make_bshd(c.kb.data(), dtype::f32, B, LK, 1, D);
    c.v = make_bshd(c.vb.data(), dtype::f32, B, LK, 1, DV);
    c.out = make_bshd(c.ob.data(), dtype::f32, B, LQ, 1, DV);
    c.q.stride_head = c.k.stride_head = c.out.stride_head = std::numeric_limits<std::int64_t>::min();
    c.l = make_lse(c.lb.data(), 1, LQ);
  });
}

TEST(Validation, OverflowingStrides) {
  constexpr std::int64_t huge = std::numeric_limits<std::int64_t>::max();
  expect_rejected([](call& c) { c.q.stride_seq = huge; }, "q strides overflow int64 addressing");
  expect_rejected([](call& c) { c.k.stride_batch = huge / 2; }, "k strides overflow int64 addressing");  // in bytes
  expect_rejected([](call& c) { c.v.stride_dim = huge / 4; }, "v strides overflow int64 addressing");
  expect_rejected([](call& c) { c.out.stride_head = huge / 3 + 1; }, "out strides overflow int64 addressing");
  expect_rejected(
      [](call& c) {
        // Each product fits, their sum does not.
        c.q.stride_batch = huge / 2;
        c.q.stride_seq = huge / 8;
      },
      "q strides overflow int64 addressing");
}

TEST(Validation, ViewPastTheEndOfTheAddressSpace) {
  expect_rejected([](call& c) { c.k.data = reinterpret_cast<void*>(std::numeric_limits<std::uintptr_t>::max() - 67); },
                  "k extends past the end of the address space");
}

TEST(Validation, OutputOverlapsItself) {
  expect_rejected([](call& c) { c.out.stride_dim = 0; }, "out.stride_dim 0 makes the output overlap itself");
  expect_rejected([](call& c) { c.out.stride_seq = 0; }, "out.stride_seq 0 makes the output overlap itself");
  expect_rejected([](call& c) { c.out.stride_batch = 0; }, "out.stride_batch 0 makes the output overlap itself");
  expect_rejected([](call& c) { c.out.stride_head = 3; }, "out.stride_head 3 makes the output overlap itself (needs |stride| >= 6)");
  // A size-1 dimension may have any stride.
  expect_accepted([](call& c) {
    c.q = make_bshd(c.qb.data(), dtype::f32, B, 1, HQ, D);
    c.out = make_bshd(c.ob.data(), dtype::f32, B, 1, HQ, DV);
    c.out.stride_seq = 0;
    c.l = make_lse(c.lb.data(), HQ, 1);
  });
}

TEST(Validation, OutputAliasesAnInput) {
  expect_rejected([](call& c) { c.out.data = c.qb.data(); }, "out aliases q");
  expect_rejected([](call& c) { c.out.data = c.kb.data() + 10; }, "out aliases k");
  expect_rejected([](call& c) { c.out.data = c.vb.data(); }, "out aliases v");
  // Partial overlap: the output ends one element into q.
  expect_rejected([](call& c) { c.q.data = c.ob.data() + (B * LQ * HQ * DV - 1); }, "out aliases q");
  // Adjacent but disjoint is fine.
  expect_accepted([](call& c) { c.q.data = c.ob.data() + B * LQ * HQ * DV; });
}

TEST(Validation, OutputAliasesASpecInput) {
  // Every buffer a spec or the options make the call read is an input: an output overlapping it is rejected (a kernel
  // writing out while it reads cu_seqlens or a table would read its own output, or crash).
  constexpr bool packed = true;
  const auto at_xb = [](call& c, std::size_t floats_in) { return c.xb.data() + floats_in; };
  const auto cu_in_xb = [](call& c, std::vector<std::int64_t>& cu, std::size_t floats_in) {
    auto* dst = reinterpret_cast<std::int64_t*>(c.xb.data() + floats_in);
    std::copy(cu.begin(), cu.end(), dst);
    return dst;
  };
  expect_rejected([&](call& c) { c.vl.cu_seqlens_q = cu_in_xb(c, c.cu_q, 0); c.out.data = at_xb(c, 0); },
                  "out aliases varlen.cu_seqlens_q: the output must not overlap an input", packed);
  expect_rejected([&](call& c) { c.vl.cu_seqlens_k = cu_in_xb(c, c.cu_k, 1000); c.out.data = at_xb(c, 1000 - 9 * HQ * DV + 1); },
                  "out aliases varlen.cu_seqlens_k", packed);  // out's last element is the first cu_seqlens_k byte
  expect_rejected([&](call& c) { c.vl.cu_seqlens_k = cu_in_xb(c, c.cu_k, 0); c.l.data = at_xb(c, 2); },
                  "lse aliases varlen.cu_seqlens_k: the output must not overlap an input", packed);
  expect_accepted([&](call& c) { c.vl.cu_seqlens_q = cu_in_xb(c, c.cu_q, 0); c.out.data = at_xb(c, 6); }, packed);
  expect_rejected([](call& c) { c.add_block_mask(); c.out.data = c.bm.kinds.data(); }, "out aliases spec.blocks.kinds");
  expect_rejected([&](call& c) { c.s.sink_logits = at_xb(c, 0); c.out.data = at_xb(c, HQ - 1); }, "out aliases spec.sink_logits");
  expect_rejected([&](call& c) { c.s.sink_logits = at_xb(c, 500); c.l.data = at_xb(c, 500); }, "lse aliases spec.sink_logits");
  expect_accepted([&](call& c) { c.s.sink_logits = at_xb(c, 0); c.out.data = at_xb(c, HQ); });
  // RoPE position ids: [axes][batch * seq] int64 each for q and k.
  static rope_spec rope;
  rope.pos_q = rope.pos_k = nullptr;
  expect_rejected(
      [&](call& c) {
        auto* ids = reinterpret_cast<std::int64_t*>(at_xb(c, 0));
        for (std::int64_t t = 0; t < B * LK; ++t) ids[t] = t % LK;
        rope.pos_q = ids;
        rope.pos_k = ids;
        c.s.rope = &rope;
        c.out.data = at_xb(c, 2 * B * LQ - 1);  // the last pos_q id; pos_k (B * LK ids) overlaps it too, later
      },
      "out aliases spec.rope.pos_q");
  expect_rejected(
      [&](call& c) {
        auto* ids = reinterpret_cast<std::int64_t*>(at_xb(c, 0));
        for (std::int64_t t = 0; t < B * LK; ++t) ids[t] = t % LK;
        rope.pos_q = ids + 3000;  // in xb's slack, far from out
        rope.pos_k = ids;
        c.s.rope = &rope;
        c.l.data = at_xb(c, 2 * B * LK - 2);
      },
      "lse aliases spec.rope.pos_k");
  // Score tables: a dense bias (borrowed) and the key tables a score owns.
  expect_rejected([&](call& c) { c.s.score = scores::bias(at_xb(c, 0), {1, 1, LQ, LK}); c.out.data = at_xb(c, LQ * LK - 1); },
                  "out aliases spec.score bias");
  expect_accepted([&](call& c) { c.s.score = scores::bias(at_xb(c, 0), {1, 1, LQ, LK}); c.out.data = at_xb(c, LQ * LK); });
  expect_rejected(
      [](call& c) {
        // One row of more weights than keys (allowed) so that the whole lse view (B * HQ * LQ floats) lies inside
        // the table: a table of LK weights would let lse run past it into whatever the heap put next (q, once).
        c.s.score = scores::then(scores::softcap(5.0), scores::reweight(std::vector<double>(B * HQ * LQ + LK, 0.5)));
        std::vector<detail::score_step> steps;
        detail::lower_score(c.s.score, steps);
        c.l.data = const_cast<float*>(steps[1].table->values_f->data());
      },
      "lse aliases spec.score reweight table");
  // A dense mask table (one byte per pair).
  expect_rejected(
      [&](call& c) {
        auto* m = reinterpret_cast<std::uint8_t*>(at_xb(c, 0));
        std::fill(m, m + LQ * LK, std::uint8_t{1});
        c.s.mask = mask_expr::dense(m, {1, 1, LQ, LK}, {0, 0, LK, 1}, "allowed") & mask_expr::full();
        c.out.data = m + 32;  // inside the 35-byte table, 4-byte aligned
      },
      "out aliases spec.mask dense 'allowed'");
}

TEST(Validation, MisalignedF32) {
  // f32 views must be 4-byte aligned (2-byte dtypes may sit anywhere: test_robustness.cc).
  const auto odd = [](std::vector<float>& b) { return reinterpret_cast<std::uint8_t*>(b.data()) + 2; };
  expect_rejected([&](call& c) { c.q.data = odd(c.qb); }, "q.data ");
  expect_rejected([&](call& c) { c.k.data = odd(c.kb); }, "is not aligned to its 4-byte f32 elements");
  expect_rejected([&](call& c) { c.out.data = odd(c.ob); }, "out.data ");
  expect_rejected([&](call& c) { c.l.data = reinterpret_cast<float*>(odd(c.lb)); }, "lse.data ");
  expect_accepted([&](call& c) {
    c.to_bf16();
    c.q.data = odd(c.qb) - 1;  // an odd address
    c.out.type = dtype::f32;
  });
}

TEST(Validation, LseErrors) {
  expect_rejected([](call& c) { c.l.data = nullptr; }, "lse.data is null");
  expect_rejected([](call& c) { c.l.stride_head = -1; }, "lse.stride_seq 1 makes the output overlap itself");  // |-1| ties with seq
  expect_rejected([](call& c) { c.l.stride_batch = std::numeric_limits<std::int64_t>::max(); }, "lse strides overflow int64 addressing");
  expect_rejected([](call& c) { c.l.stride_seq = 0; }, "lse.stride_seq 0 makes the output overlap itself");
  expect_rejected([](call& c) { c.l.stride_head = 2; }, "lse.stride_head 2 makes the output overlap itself");
  expect_rejected([](call& c) { c.l.data = c.qb.data(); }, "lse aliases q: the output must not overlap an input");
  expect_rejected([](call& c) { c.l.data = c.kb.data() + 3; }, "lse aliases k");
  expect_rejected([](call& c) { c.l.data = c.vb.data(); }, "lse aliases v");
  expect_rejected([](call& c) { c.l.data = c.ob.data() + 7; }, "lse aliases out");
}

TEST(Validation, NonFiniteScale) {
  expect_rejected([](call& c) { c.s.scale = std::numeric_limits<double>::infinity(); }, "spec.scale inf must be finite");
  expect_rejected([](call& c) { c.s.scale = -std::numeric_limits<double>::infinity(); }, "spec.scale -inf must be finite");
  expect_rejected([](call& c) { c.s.scale = std::numeric_limits<double>::quiet_NaN(); }, "must be finite");
  expect_rejected([](call& c) { c.s.scale = std::numeric_limits<double>::quiet_NaN(); }, "spec.scale");
}

TEST(Validation, ScalarsOutOfFloatRange) {
  // Finite as double, not as float: the kernels would silently compute inf / 0 where the oracle does not.
  expect_rejected([](call& c) { c.s.scale = 1e39; }, "spec.scale 1e+39 is out of float range (|scale| * log2(e) must be <= 3.40282e+38)");
  expect_rejected([](call& c) { c.s.scale = -3e38; }, "spec.scale -3e+38 is out of float range");
  expect_accepted([](call& c) { c.s.scale = 2e38; });
  static std::vector<float> sinks;
  sinks.assign(HQ, 0.5f);
  sinks[2] = 3e38f;
  expect_rejected([](call& c) { c.s.sink_logits = sinks.data(); }, "spec.sink_logits[2] 3e+38 must be finite with |sink| * log2(e) <= 3.40282e+38");
  // The softmax scale times the temperature / LogN multipliers.
  expect_rejected([](call& c) { c.s.scale = 1e10; c.s.score = scores::temperature({1.0, 1e-30}); },
                  "spec.score the softmax scale 1e+10 times the temperature / logn factors and log2(e) is 1.4427e+40, beyond float range");
  expect_accepted([](call& c) { c.s.scale = 1e10; c.s.score = scores::temperature({1.0, 1e-20}); });
  // Modifier parameters that no call could use are rejected when the modifier is built.
  const auto throws = [](const std::function<void()>& f, const std::string& what) {
    try {
      f();
      ADD_FAILURE() << "no exception: " << what;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()), what);
    }
  };
  throws([] { scores::softcap(1e39); }, "[scores::softcap] cap must be in float range: cap * log2(e) and 1 / cap at most 3.4e38");
  throws([] { scores::softcap(1e-39); }, "[scores::softcap] cap must be in float range: cap * log2(e) and 1 / cap at most 3.4e38");
  throws([] { scores::temperature({2.0, 1e-40}); }, "[scores::temperature] 1 / t must be a finite float (|t| >= 3e-39)");
  throws([] { scores::alibi({0.5, 1e39}); }, "[scores::alibi] slopes must be finite floats (|slope| <= 3.4e38)");
  throws([] { scores::alibi({std::nan("")}); }, "[scores::alibi] slopes must be finite floats (|slope| <= 3.4e38)");
  throws([] { scores::key_bias({0.0, -1e40}); }, "[scores::key_bias] values must be floats (|x| <= 3.4e38; -inf masks)");
  throws([] { scores::relative_bias(std::vector<double>(8, 1e300), 8, 16, false); },
         "[scores::relative_bias] values must be floats (|x| <= 3.4e38)");
  std::string err;
  score_fn f;
  EXPECT_EQ(parse_score("softcap(1e39)", 4, f).rfind("[spec] at 8: [scores::softcap] cap must be in float range", 0), 0u);
  // -inf in a key bias masks the key, as documented.
  EXPECT_NO_THROW(scores::key_bias({0.0, -std::numeric_limits<double>::infinity()}));
}

TEST(Validation, AlibiOffsetOverflow) {
  constexpr std::int64_t max = std::numeric_limits<std::int64_t>::max(), min = std::numeric_limits<std::int64_t>::min();
  // k - q + offset for every key k < seq_k 7 and query q < seq_q 5 must be an int64 (the oracle computes it so).
  expect_rejected([](call& c) { c.s.score = scores::alibi({1e-12}, max); },
                  "spec.score alibi offset 9223372036854775807: k - q + offset leaves int64 for seq_q 5, seq_k 7");
  expect_rejected([](call& c) { c.s.score = scores::alibi({1e-12}, max - 5); }, "spec.score alibi offset 9223372036854775802");
  expect_rejected([](call& c) { c.s.score = scores::then(scores::softcap(3), scores::alibi({1e-12}, min + 3)); },
                  "spec.score alibi offset -9223372036854775805");
  // The extremes that fit: the kernel's ragged last key tile reads past seq_k without overflowing.
  expect_accepted([](call& c) { c.s.score = scores::alibi({1e-20}, max - (LK - 1)); });
  expect_accepted([](call& c) { c.s.score = scores::alibi({1e-20}, min + (LQ - 1)); });
  // The bias slope * (k - q + offset) must also be a float.
  expect_rejected([](call& c) { c.s.score = scores::alibi({0.25, 1e30}, std::int64_t{1} << 40); },
                  "spec.score alibi bias reaches 1.09951e+42 (slope 1e+30 times k - q + offset up to 1.09951e+12), beyond float range");
}

TEST(Validation, BadEnums) {
  expect_rejected([](call& c) { c.s.causal = static_cast<causal_mode>(5); }, "spec.causal 5 is not a causal_mode");
  expect_rejected([](call& c) { c.o.use = static_cast<backend>(7); }, "options.use 7 is not a backend");
  expect_rejected([](call& c) { c.s.mask = mask_expr::window(0, 0, static_cast<causal_mode>(5)); },
                  "spec.mask window: align 5 must be causal_mode::top_left (1) or causal_mode::bottom_right (2)");
  expect_rejected([](call& c) { c.s.mask = mask_expr::sinks(2) | mask_expr::prefix_lm(1, causal_mode::none); },
                  "spec.mask prefix_lm: align 0 must be causal_mode::top_left (1) or causal_mode::bottom_right (2)");
}

TEST(Validation, InvalidMaskExpression) {
  expect_rejected([](call& c) { c.s.mask = mask_expr::sinks(-1); }, "spec.mask sinks: n -1 must be >= 0");
  expect_rejected([](call& c) { c.s.mask = mask_expr::block_causal(0); }, "spec.mask block_causal: block 0 must be > 0");
  expect_rejected([](call& c) { c.s.mask = mask_expr::dilated(0) | mask_expr::full(); }, "spec.mask dilated: dilation 0 must be > 0");
  expect_rejected([](call& c) { c.s.mask = mask_expr::document({2, 5}); }, "spec.mask document: offsets must start at 0");
  expect_rejected([](call& c) { c.s.mask = mask_expr::document({0, 5, 3}); }, "spec.mask document: offsets must be non-decreasing");
  expect_accepted([](call& c) { c.s.mask = mask_expr::window(2, -1, causal_mode::bottom_right) & mask_expr::document({0, 3, 7}); });
  // A tree built in code that nests deeper than the readers may recurse; a 10,000-term | chain is one level.
  expect_rejected(
      [](call& c) {
        mask_expr m = mask_expr::sinks(1);
        for (int level = 0; level < 500; ++level) m = level % 2 ? std::move(m) | mask_expr::sinks(2) : std::move(m) & mask_expr::full();
        c.s.mask = m;
      },
      "spec.mask expression nests deeper than 200 (depth 501");
  expect_accepted([](call& c) {
    mask_expr m = mask_expr::sinks(1);
    for (int t = 0; t < 10000; ++t) m = std::move(m) | mask_expr::window(t, 0, causal_mode::top_left);
    c.s.mask = m;
  });
}

TEST(Validation, NegativeThreads) {
  expect_rejected([](call& c) { c.o.threads = -1; }, "options.threads -1 must be >= 0");
  expect_rejected([](call& c) { c.o.threads = std::numeric_limits<int>::min(); }, "options.threads");
}

TEST(Validation, TooManyThreads) {
  // A sane bound instead of trying to start thousands of threads.
  expect_rejected([](call& c) { c.o.threads = 1024; }, "options.threads 1024 must be <= ");
  expect_rejected([](call& c) { c.o.threads = std::numeric_limits<int>::max(); }, "options.threads 2147483647 must be <=");
  // The bound, as the message states it: 4 x the processors, at least 8; it is accepted, one more is not.
  call c;
  c.o.threads = 1024;
  const std::string err = attention(c.q, c.k, c.v, c.out, c.s, c.o).error;
  const int limit = std::stoi(err.substr(err.find("<= ") + 3));
  EXPECT_GE(limit, 8);
  EXPECT_EQ(limit % 4, limit > 8 ? 0 : limit % 4);
  expect_rejected([limit](call& c) { c.o.threads = limit + 1; }, "processors, at least 8)");
  expect_accepted([limit](call& c) { c.o.threads = limit; });
}

TEST(Validation, Varlen) {
  constexpr bool packed = true;
  expect_rejected([](call& c) { c.vl.num_seqs = 0; }, "varlen.cu_seqlens_q[0] 0 != total tokens 9", packed);
  expect_rejected([](call& c) { c.vl.num_seqs = -2; }, "varlen.num_seqs -2 must be >= 0", packed);
  expect_rejected([](call& c) { c.vl.cu_seqlens_q = nullptr; }, "varlen.cu_seqlens_q is null", packed);
  expect_rejected([](call& c) { c.vl.cu_seqlens_k = nullptr; }, "varlen.cu_seqlens_k is null", packed);
  expect_rejected(
      [](call& c) {
        c.q.batch = c.k.batch = c.v.batch = c.out.batch = 2;
        c.q.seq = c.out.seq = 4;
        c.k.seq = c.v.seq = 6;
        c.l = make_lse(c.lb.data(), HQ, 4);
      },
      "q.batch 2 must be 1 with varlen", packed);
  expect_rejected([](call& c) { c.cu_q[0] = 1; }, "varlen.cu_seqlens_q[0] 1 must be 0", packed);
  expect_rejected([](call& c) { c.cu_k[0] = -1; }, "varlen.cu_seqlens_k[0] -1 must be 0", packed);
  expect_rejected(
      [](call& c) {
        c.cu_q = {0, 6, 4, 9};
        c.cu_k = {0, 5, 6, 12};
        c.vl = {c.cu_q.data(), c.cu_k.data(), 3};
      },
      "varlen.cu_seqlens_q[2] 4 < [1] 6: must be non-decreasing", packed);
  expect_rejected(
      [](call& c) {
        c.cu_k = {0, 7, 5};
        c.vl.cu_seqlens_k = c.cu_k.data();
      },
      "varlen.cu_seqlens_k[2] 5 < [1] 7: must be non-decreasing", packed);
  expect_rejected([](call& c) { c.cu_k[2] = 11; }, "varlen.cu_seqlens_k[2] 11 != total tokens 12", packed);
  expect_rejected([](call& c) { c.cu_q[2] = 10; }, "varlen.cu_seqlens_q[2] 10 != total tokens 9", packed);
  // Empty sequences are fine.
  expect_accepted(
      [](call& c) {
        c.cu_q = {0, 0, 4, 9};
        c.cu_k = {0, 5, 5, 12};
        c.vl = {c.cu_q.data(), c.cu_k.data(), 3};
      },
      packed);
}

TEST(Validation, BlockMaskDimensions) {
  expect_rejected([](call& c) { c.add_block_mask(); c.bm.q_tile = 0; }, "spec.blocks.q_tile 0 must be > 0");
  expect_rejected([](call& c) { c.add_block_mask(); c.bm.kv_tile = -4; }, "spec.blocks.kv_tile -4 must be > 0");
  expect_rejected([](call& c) { c.add_block_mask(); c.bm.q_tiles = 2; }, "spec.blocks.q_tiles 2 != ceil(seq_q 5 / q_tile 2) = 3");
  expect_rejected([](call& c) { c.add_block_mask(); c.bm.kv_tiles = 3; }, "spec.blocks.kv_tiles 3 != ceil(seq_k 7 / kv_tile 4) = 2");
  expect_rejected([](call& c) { c.add_block_mask(); c.bm.batch = 3; }, "spec.blocks.batch 3 must be 1 or 2");
  expect_rejected([](call& c) { c.add_block_mask(); c.bm.heads = 2; }, "spec.blocks.heads 2 must be 1 or 4");
  expect_rejected([](call& c) { c.add_block_mask(); c.bm.kinds.pop_back(); }, "spec.blocks.kinds has 5 entries, expected 6");
  expect_rejected([](call& c) { c.add_block_mask(); c.bm.kinds[4] = static_cast<tile_kind>(3); }, "spec.blocks.kinds holds 3, not a tile_kind");
  // Per-batch, per-head masks are fine.
  expect_accepted([](call& c) {
    c.add_block_mask();
    c.bm.batch = B;
    c.bm.heads = HQ;
    c.bm.kinds.assign(static_cast<std::size_t>(B * HQ * 6), tile_kind::full);
  });
}

TEST(Validation, BlockMaskHugeTilesDoNotOverflow) {
  constexpr std::int64_t huge = std::numeric_limits<std::int64_t>::max();
  // ceil(5 / INT64_MAX) is 1: a mask that claims 0 tiles (and so holds no kinds) must not pass and be read past its end.
  expect_rejected(
      [](call& c) {
        c.add_block_mask();
        c.bm.q_tile = huge;
        c.bm.q_tiles = 0;
        c.bm.kinds.clear();
      },
      "spec.blocks.q_tiles 0 != ceil(seq_q 5 / q_tile 9223372036854775807) = 1");
  expect_rejected(
      [](call& c) {
        c.add_block_mask();
        c.bm.kv_tile = huge;
        c.bm.kv_tiles = 0;
        c.bm.kinds.clear();
      },
      "spec.blocks.kv_tiles 0 != ceil(seq_k 7 / kv_tile 9223372036854775807) = 1");
  // One tile covering everything is a valid mask.
  expect_accepted([](call& c) {
    c.add_block_mask();
    c.bm.q_tile = c.bm.kv_tile = huge;
    c.bm.q_tiles = c.bm.kv_tiles = 1;
    c.bm.kinds.assign(1, tile_kind::full);
  });
  // A kinds count whose product leaves int64 is reported, not wrapped into a small number: 2^32 x 2^32 one-token
  // tiles over broadcast (stride 0) q / k / v and an output view that validation never dereferences (the call is
  // rejected first), placed far from the heap so it overlaps no input.
  expect_rejected(
      [](call& c) {
        constexpr std::int64_t n = std::int64_t{1} << 32;
        c.q.seq = c.k.seq = c.v.seq = c.out.seq = n;
        c.q.stride_seq = c.k.stride_seq = c.v.stride_seq = 0;
        c.out.data = reinterpret_cast<void*>(std::uintptr_t{1} << 46);
        c.out.stride_batch = n * HQ * DV;
        c.o.lse = nullptr;
        c.add_block_mask();
        c.bm.q_tile = c.bm.kv_tile = 1;
        c.bm.q_tiles = c.bm.kv_tiles = n;
        c.bm.kinds.clear();
      },
      "spec.blocks: batch * heads * q_tiles * kv_tiles overflows int64");
  // build_block_mask takes the same tile sizes.
  call c;
  attn_params p;
  ASSERT_TRUE(make_params(c.q, c.k, c.v, c.out, c.s, c.o, p).ok());
  const block_mask bm = build_block_mask(p, huge, huge);
  EXPECT_EQ(bm.q_tiles, 1);
  EXPECT_EQ(bm.kv_tiles, 1);
  EXPECT_EQ(bm.kinds.size(), 1u);
}

TEST(Validation, NoKernelFitsLeavesOutputUntouched) {
  // Passes validation but no cpu kernel can pack K/V broadcast to 2^40 keys: the error is reported before anything runs.
  call c;
  c.k.seq = c.v.seq = std::int64_t{1} << 40;
  c.k.stride_seq = c.v.stride_seq = 0;
  c.o.use = backend::cpu;
  const status st = attention(c.q, c.k, c.v, c.out, c.s, c.o);
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(st.error.rfind("[attention] no cpu kernel fits:", 0), 0u) << st.error;
  EXPECT_NE(st.error.find("GiB of working memory"), std::string::npos) << st.error;
  EXPECT_TRUE(all_sentinel(c.ob));
  EXPECT_TRUE(all_sentinel(c.lb));
}

}  // namespace
}  // namespace omniattn
