// `omniattn bench --decode`: attention_decode on a paged KV cache against this machine's measured read bandwidth,
// with the forward kernel and the unfused OpenBLAS path on the same K/V (contiguous tensors) as baselines.
//   GB/s = bytes of cached K/V the call must read (every cached slot of every (sequence, kv head), K and V, in the
//          cache's storage dtype) / median time;  %bw = against the read-bandwidth probe at the same thread count.
// The probe sums a 2 GiB float array with the widest vector loads this CPU has (four independent accumulators) on t
// threads, best of 3: what a streaming read of the cache can reach here.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "bench/measure.h"
#include "omniattn/omniattn.h"

namespace omniattn::bench {
namespace {

double read_bandwidth_gbs(int threads) {
  const std::size_t n = (std::size_t{2} << 30) / 4;
  std::vector<float> a(n);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (std::size_t i = 0; i < n; ++i) a[i] = 1.0f;  // first touch by the thread that reads it
  double best = 0.0;
  volatile float sink = 0.0f;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const auto t = static_cast<std::size_t>(omp_get_thread_num()), nt = static_cast<std::size_t>(omp_get_num_threads());
      const std::size_t blocks = n / 64, b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;  // same split as the first touch
      total += read_sum(a.data() + b0 * 64, (b1 - b0) * 64);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + total;
    best = std::max(best, static_cast<double>(n * 4) / s / 1e9);
  }
  return best;
}

std::vector<std::int64_t> ints(const std::string& s) {
  std::vector<std::int64_t> out;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ',')) out.push_back(std::strtoll(x.c_str(), nullptr, 10));
  return out;
}

int usage(const char* msg) {
  if (msg) std::fprintf(stderr, "omniattn bench --decode: %s\n", msg);
  std::fprintf(stderr,
               "usage: omniattn bench --decode [--keys 4096,32768,131072] [--lq 1,4,64] [--batch 1,16] [--threads 1,2]\n"
               "                      [--dtype f32,bf16] [--heads 32:8] [--d 128] [--page 16] [--budget SECONDS]\n"
               "                      [--max-gib 4] [--no-baselines] [--cascade]\n");
  return 2;
}

timing time_call(const std::function<void()>& fn, double budget) {
  measure_policy policy;
  policy.budget_s = budget;
  policy.min_reps = 3;
  policy.max_reps = 40;
  policy.cap_s = 1e9;
  return measure(fn, policy);
}

}  // namespace

int decode_main(int argc, char** argv) {
  std::vector<std::int64_t> keys = {4096, 32768, 131072}, lqs = {1, 4, 64}, batches = {1, 16}, threads = {1, 2};
  std::vector<std::string> dtypes = {"f32", "bf16"};
  std::int64_t hq = 32, hkv = 8, d = 128, page = 16;
  double budget = 0.5, max_gib = 4.0;
  bool baselines = true, cascade = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const bool v = i + 1 < argc;
    if (a == "--decode") continue;
    if (a == "--keys" && v) keys = ints(argv[++i]);
    else if (a == "--lq" && v) lqs = ints(argv[++i]);
    else if (a == "--batch" && v) batches = ints(argv[++i]);
    else if (a == "--threads" && v) threads = ints(argv[++i]);
    else if (a == "--d" && v) d = std::strtoll(argv[++i], nullptr, 10);
    else if (a == "--page" && v) page = std::strtoll(argv[++i], nullptr, 10);
    else if (a == "--budget" && v) budget = std::strtod(argv[++i], nullptr);
    else if (a == "--max-gib" && v) max_gib = std::strtod(argv[++i], nullptr);
    else if (a == "--no-baselines") baselines = false;
    else if (a == "--cascade") cascade = true;
    else if (a == "--dtype" && v) {
      dtypes.clear();
      std::stringstream ss(argv[++i]);
      std::string x;
      while (std::getline(ss, x, ',')) dtypes.push_back(x);
    } else if (a == "--heads" && v) {
      const std::string h = argv[++i];
      const auto colon = h.find(':');
      if (colon == std::string::npos) return usage("--heads expects HQ:HKV");
      hq = std::strtoll(h.substr(0, colon).c_str(), nullptr, 10);
      hkv = std::strtoll(h.substr(colon + 1).c_str(), nullptr, 10);
    } else {
      return usage(("unknown or incomplete argument '" + a + "'").c_str());
    }
  }
  std::printf("omniattn bench --decode   isa=%s   cpu=%s   heads %lld:%lld  D=%lld  page=%lld  causal\n", isa_name(),
              cpu_model().c_str(), static_cast<long long>(hq), static_cast<long long>(hkv), static_cast<long long>(d),
              static_cast<long long>(page));
  std::vector<double> bw;
  for (const std::int64_t t : threads) {
    bw.push_back(read_bandwidth_gbs(static_cast<int>(t)));
    std::printf("read bandwidth with %lld thread(s): %.1f GB/s (sum of a 2 GiB array, best of 3)\n", static_cast<long long>(t), bw.back());
  }
  std::printf("\nGB/s = cached K/V bytes read / median time; %%bw against the probe; fwd = attention() (the forward kernel) on the\n"
              "same K/V as contiguous tensors; blas = the unfused OpenBLAS path (f32 only); x = their time / decode time;\n"
              "<dtype>* rows (--cascade): the batch shares one prompt (fork), read once per step\n\n");
  std::printf("%-5s %7s %4s %5s %3s | %10s %8s %6s | %10s %6s | %10s %6s\n", "cache", "keys", "lq", "batch", "thr", "decode ms",
              "GB/s", "%bw", "fwd ms", "x fwd", "blas ms", "x blas");
  std::mt19937_64 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const std::string& dt : dtypes) {
    const dtype storage = dt == "bf16" ? dtype::bf16 : dt == "f16" ? dtype::f16 : dtype::f32;
    const std::int64_t elem = dtype_size(storage);
    for (const std::int64_t nkeys : keys)
      for (const std::int64_t batch : batches) {
        const double gib = static_cast<double>(batch * nkeys * hkv * 2 * d * elem) / (1u << 30);
        const bool too_big = gib > max_gib;
        if (too_big)
          std::printf("%-5s %7lld %4s %5lld %3s | skipped: the cache would hold %.1f GiB (> --max-gib %.1f)\n", dt.c_str(),
                      static_cast<long long>(nkeys), "*", static_cast<long long>(batch), "*", gib, max_gib);
        std::vector<float> chunk(static_cast<std::size_t>(4096 * hkv * d * 2));
        for (float& x : chunk) {
          x = nd(rng);
          if (storage == dtype::bf16) x = bf16_to_f32(f32_to_bf16(x));
          if (storage == dtype::f16) x = f16_to_f32(f32_to_f16(x));
        }
        const double bytes = static_cast<double>(batch * nkeys * hkv * (2 * d) * elem);
        if (!too_big) {
        kv_cache cache({hkv, d, d, page, storage, std::nullopt});
        // K / V in the cache's dtype as contiguous tensors too, for the forward baseline.
        std::vector<std::uint16_t> kv16;
        std::vector<float> kv32;
        const std::int64_t per_seq = nkeys * hkv * d;
        const bool keep_tensors = baselines && 2 * gib <= max_gib;
        if (keep_tensors) {
          if (storage == dtype::f32) kv32.resize(static_cast<std::size_t>(2 * batch * per_seq));
          else kv16.resize(static_cast<std::size_t>(2 * batch * per_seq));
        }
        std::vector<std::int64_t> seqs;
        for (std::int64_t b = 0; b < batch; ++b) {
          const std::int64_t seq = cache.add_sequence();
          seqs.push_back(seq);
          for (std::int64_t t0 = 0; t0 < nkeys; t0 += 4096) {
            const std::int64_t n = std::min<std::int64_t>(4096, nkeys - t0);
            for (std::int64_t x = 0; x < 2 * n * hkv * d; ++x) {
              float f = nd(rng);
              if (storage == dtype::bf16) f = bf16_to_f32(f32_to_bf16(f));
              if (storage == dtype::f16) f = f16_to_f32(f32_to_f16(f));
              chunk[static_cast<std::size_t>(x)] = f;
            }
            float* kp = chunk.data();
            float* vp = chunk.data() + n * hkv * d;
            if (!cache.append(seq, make_bshd(kp, dtype::f32, 1, n, hkv, d), make_bshd(vp, dtype::f32, 1, n, hkv, d)).ok()) return 1;
            if (keep_tensors)
              for (std::int64_t x = 0; x < n * hkv * d; ++x) {
                const std::size_t ko = static_cast<std::size_t>(b * per_seq + t0 * hkv * d + x);
                const std::size_t vo = static_cast<std::size_t>(batch * per_seq) + ko;
                if (storage == dtype::f32) {
                  kv32[ko] = kp[x];
                  kv32[vo] = vp[x];
                } else {
                  kv16[ko] = storage == dtype::bf16 ? f32_to_bf16(kp[x]) : f32_to_f16(kp[x]);
                  kv16[vo] = storage == dtype::bf16 ? f32_to_bf16(vp[x]) : f32_to_f16(vp[x]);
                }
              }
          }
        }
        void* kbase = storage == dtype::f32 ? static_cast<void*>(kv32.data()) : static_cast<void*>(kv16.data());
        void* vbase = storage == dtype::f32 ? static_cast<void*>(kv32.data() + batch * per_seq)
                                            : static_cast<void*>(kv16.data() + batch * per_seq);
        for (const std::int64_t lq : lqs)
          for (std::size_t ti = 0; ti < threads.size(); ++ti) {
            const int thr = static_cast<int>(threads[ti]);
            std::vector<float> q(static_cast<std::size_t>(batch * lq * hq * d)), out(q.size());
            for (float& x : q) x = nd(rng);
            const tensor qt = make_bshd(q.data(), dtype::f32, batch, lq, hq, d);
            const tensor ot = make_bshd(out.data(), dtype::f32, batch, lq, hq, d);
            spec sp;
            sp.causal = causal_mode::bottom_right;
            decode_options o;
            o.threads = thr;
            if (const status st = attention_decode(qt, cache, seqs, ot, sp, o); !st) {
              std::fprintf(stderr, "%s\n", st.error.c_str());
              return 1;
            }
            const timing td = time_call([&] { attention_decode(qt, cache, seqs, ot, sp, o); }, budget);
            const double ms = td.median_s * 1e3, gbs = bytes / td.median_s / 1e9;
            std::printf("%-5s %7lld %4lld %5lld %3d | %10.3f %8.2f %5.0f%% |", dt.c_str(), static_cast<long long>(nkeys),
                        static_cast<long long>(lq), static_cast<long long>(batch), thr, ms, gbs, 100.0 * gbs / bw[ti]);
            if (keep_tensors) {
              // The forward kernel on the same problem: q in the cache's dtype (the forward takes one input dtype).
              std::vector<std::uint16_t> q16(q.size());
              for (std::size_t x = 0; x < q.size(); ++x) q16[x] = storage == dtype::bf16 ? f32_to_bf16(q[x]) : f32_to_f16(q[x]);
              const tensor fq = storage == dtype::f32 ? qt : make_bshd(q16.data(), storage, batch, lq, hq, d);
              const tensor fk = make_bshd(kbase, storage, batch, nkeys, hkv, d), fv = make_bshd(vbase, storage, batch, nkeys, hkv, d);
              options fo;
              fo.threads = thr;
              const timing tf = time_call([&] { attention(fq, fk, fv, ot, sp, fo); }, budget);
              std::printf(" %10.3f %5.1fx |", tf.median_s * 1e3, tf.median_s / td.median_s);
              if (storage == dtype::f32) {
                attn_params fp;
                if (make_params(fq, fk, fv, ot, sp, fo, fp).ok()) {
                  const timing tb = time_call([&] { openblas_unfused(fp, thr); }, budget);
                  std::printf(" %10.3f %5.1fx\n", tb.median_s * 1e3, tb.median_s / td.median_s);
                } else {
                  std::printf(" %10s %6s\n", "-", "-");
                }
              } else {
                std::printf(" %10s %6s\n", "f32 only", "-");
              }
            } else {
              std::printf(" %10s %6s | %10s %6s\n", "-", "-", "-", "-");
            }
            std::fflush(stdout);
          }
        }
        if (batch > 1 && cascade) {
          // Cascade: the batch forks one prompt of nkeys - 1 tokens and appends one token each; the prompt's pages are
          // read once per step for all sequences. GB/s counts the bytes the batch attends to (as the rows above).
          kv_cache shared({hkv, d, d, page, storage, std::nullopt});
          std::vector<std::int64_t> fseqs = {shared.add_sequence()};
          for (std::int64_t t0 = 0; t0 < nkeys - 1; t0 += 4096) {
            const std::int64_t n = std::min<std::int64_t>(4096, nkeys - 1 - t0);
            if (!shared.append(fseqs[0], make_bshd(chunk.data(), dtype::f32, 1, n, hkv, d),
                               make_bshd(chunk.data() + n * hkv * d, dtype::f32, 1, n, hkv, d)).ok())
              return 1;
          }
          for (std::int64_t b = 1; b < batch; ++b) {
            std::int64_t child = -1;
            if (!shared.fork(fseqs[0], child).ok()) return 1;
            fseqs.push_back(child);
          }
          for (const std::int64_t seq : fseqs)
            if (!shared.append(seq, make_bshd(chunk.data(), dtype::f32, 1, 1, hkv, d), make_bshd(chunk.data() + hkv * d, dtype::f32, 1, 1, hkv, d)).ok())
              return 1;
          for (const std::int64_t lq : lqs) {
            if (lq != 1) continue;
            for (std::size_t ti = 0; ti < threads.size(); ++ti) {
              const int thr = static_cast<int>(threads[ti]);
              std::vector<float> q(static_cast<std::size_t>(batch * hq * d)), out(q.size());
              for (float& x : q) x = nd(rng);
              const tensor qt = make_bshd(q.data(), dtype::f32, batch, 1, hq, d);
              const tensor ot = make_bshd(out.data(), dtype::f32, batch, 1, hq, d);
              spec sp;
              sp.causal = causal_mode::bottom_right;
              decode_options o;
              o.threads = thr;
              const timing td = time_call([&] { attention_decode(qt, shared, fseqs, ot, sp, o); }, budget);
              const double gbs = bytes / td.median_s / 1e9;
              std::printf("%-5s %7lld %4d %5lld %3d | %10.3f %8.2f %5.0f%% | shared prefix (cascade): %.1f MiB cached\n",
                          (dt + "*").c_str(), static_cast<long long>(nkeys), 1, static_cast<long long>(batch), thr,
                          td.median_s * 1e3, gbs, 100.0 * gbs / bw[ti], static_cast<double>(shared.memory().data_bytes) / (1 << 20));
            }
          }
        }
      }
  }
  return 0;
}

}  // namespace omniattn::bench
