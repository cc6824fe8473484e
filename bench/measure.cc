// Timing, memory, machine peaks (with their cache), useful-pair counts and the sampled-row oracle check.
#include "bench/measure.h"

#include <malloc.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "bench/json.h"
#include "core/problem.h"
#include "core/storage.h"
#include "cpu/probe.h"

namespace omniattn::bench {

timing measure(const std::function<void()>& fn, const measure_policy& policy) {
  using clock = std::chrono::steady_clock;
  const auto seconds = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
  if (policy.warm_up) fn();
  std::vector<double> t;
  const auto start = clock::now();
  while (true) {
    const auto t0 = clock::now();
    fn();
    t.push_back(seconds(t0, clock::now()));
    const double spent = seconds(start, clock::now());
    const int reps = static_cast<int>(t.size());
    if (reps >= policy.max_reps || spent >= policy.cap_s) break;
    if (reps >= policy.min_reps && spent >= policy.budget_s) break;
  }
  std::sort(t.begin(), t.end());
  const std::size_t n = t.size();
  timing r;
  r.reps = static_cast<int>(n);
  r.median_s = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
  r.min_s = t.front();
  r.max_s = t.back();
  r.q1_s = t[(n - 1) / 4];
  r.q3_s = t[(3 * (n - 1) + 3) / 4];
  return r;
}

cpu_sample sample_cpu() {
  cpu_sample c;
  c.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  std::ifstream f("/proc/stat");
  std::string cpu;
  unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  if (f >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal && cpu == "cpu") {
    const double tick = 1.0 / static_cast<double>(sysconf(_SC_CLK_TCK));
    c.busy_s = static_cast<double>(user + nice + system + irq + softirq) * tick;
    c.steal_s = static_cast<double>(steal) * tick;
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  c.self_s = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
             1e-6 * static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  return c;
}

double disturbed_pct(const cpu_sample& a, const cpu_sample& b, int threads) {
  const double wall = b.wall_s - a.wall_s;
  if (wall <= 0 || threads <= 0) return 0.0;
  const double others = std::max(0.0, (b.busy_s - a.busy_s) - (b.self_s - a.self_s)) + std::max(0.0, b.steal_s - a.steal_s);
  const double spare = std::max(0, static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)) - threads) * wall;
  return std::clamp(100.0 * std::max(0.0, others - spare) / (threads * wall), 0.0, 100.0);
}

steady_timing measure_steady(const std::function<void()>& fn, const measure_policy& policy, int threads,
                             const std::function<void()>& before_attempt, double max_disturbed_pct, int max_attempts) {
  steady_timing best;
  for (int attempt = 1; attempt <= max_attempts; ++attempt) {
    if (attempt > 1) std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let a burst of other work pass
    if (before_attempt) before_attempt();
    const cpu_sample a = sample_cpu();
    const timing t = measure(fn, policy);
    const double d = disturbed_pct(a, sample_cpu(), threads);
    if (attempt == 1 || d < best.disturbed_pct) {
      best.t = t;
      best.disturbed_pct = d;
    }
    best.attempts = attempt;
    if (best.disturbed_pct <= max_disturbed_pct) break;
  }
  return best;
}

namespace {

double status_field_mib(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::size_t len = std::char_traits<char>::length(field);
  while (std::getline(f, line))
    if (line.compare(0, len, field) == 0) return std::strtod(line.c_str() + len, nullptr) / 1024.0;
  return 0.0;
}

}  // namespace

void reset_peak_rss() {
  // Free heap memory goes back to the OS first, so what the next call allocates shows up as new resident memory
  // instead of reusing pages a previous measurement left behind.
  malloc_trim(0);
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
}

double peak_rss_mib() { return status_field_mib("VmHWM:"); }
double current_rss_mib() { return status_field_mib("VmRSS:"); }

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) break;
    std::string name = line.substr(colon + 1);
    name.erase(0, name.find_first_not_of(" \t"));
    return name;
  }
  return "unknown";
}

int available_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return 1;
}

std::string peak_cache_path() {
  if (const char* p = std::getenv("OMNIATTN_PEAK_CACHE"); p && *p) return p;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/omniattn/peak.json";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/omniattn/peak.json";
  return "";
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

namespace {

bool same_key(const json& e, const std::string& cpu, const std::string& isa, int threads) {
  const json *c = e.find("cpu"), *i = e.find("isa"), *t = e.find("threads");
  return c && i && t && c->is_string() && i->is_string() && t->is_number() && c->as_string() == cpu && i->as_string() == isa &&
         t->as_number() == threads;
}

}  // namespace

std::vector<machine_peak> machine_peaks(const std::vector<int>& threads, bool use_cache, const std::string& isa,
                                        std::string& note) {
  const std::string path = peak_cache_path(), cpu = cpu_model();
  json cache = json::object();
  if (!path.empty()) {
    std::ifstream f(path);
    if (f) {
      std::stringstream ss;
      ss << f.rdbuf();
      std::string why;
      json doc;
      if (json::parse(ss.str(), doc, why) && doc.is_object() && doc.find("entries") && doc.find("entries")->is_array())
        cache = std::move(doc);
      else
        note = "peak cache " + path + " is unreadable (" + (why.empty() ? "unexpected layout" : why) + "); re-measured";
    }
  }
  if (!cache.find("entries")) {
    cache.set("schema", "omniattn-peak-cache/1");
    cache.set("entries", json::array());
  }
  std::vector<machine_peak> out;
  bool changed = false;
  for (const int t : threads) {
    machine_peak mp;
    mp.threads = t;
    const json* hit = nullptr;
    for (const json& e : cache.find("entries")->items())
      if (same_key(e, cpu, isa, t)) hit = &e;
    const json *fp = hit ? hit->find("fp32_fma_gflops") : nullptr, *bf = hit ? hit->find("bf16_dot_gflops") : nullptr;
    if (use_cache && fp && bf && fp->is_number() && bf->is_number() && fp->as_number() > 0) {
      mp.fp32_fma_gflops = fp->as_number();
      mp.bf16_dot_gflops = bf->as_number();
      mp.source = "cache";
    } else {
      // Best of three probes (each the best of 8 bursts): a busy neighbour on a shared machine lowers a measured peak,
      // never raises it.
      for (int rep = 0; rep < 3; ++rep) {
        mp.fp32_fma_gflops = std::max(mp.fp32_fma_gflops, cpu::measure_fp32_peak(t));
        mp.bf16_dot_gflops = std::max(mp.bf16_dot_gflops, cpu::measure_bf16_dot_peak(t));
      }
      mp.source = "measured";
      json entry = json::object();
      entry.set("cpu", cpu);
      entry.set("isa", isa);
      entry.set("threads", t);
      entry.set("fp32_fma_gflops", mp.fp32_fma_gflops);
      entry.set("bf16_dot_gflops", mp.bf16_dot_gflops);
      entry.set("measured_at", utc_now());
      json fresh = json::array();
      for (const json& e : cache.find("entries")->items())
        if (!same_key(e, cpu, isa, t)) fresh.push(e);
      fresh.push(std::move(entry));
      cache.set("entries", std::move(fresh));
      changed = true;
    }
    out.push_back(mp);
  }
  if (changed && !path.empty()) {
    std::error_code ec;
    const std::filesystem::path p(path);
    if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
    const std::string tmp = path + ".tmp";
    {
      std::ofstream f(tmp);
      f << cache.dump() << "\n";
    }
    std::filesystem::rename(tmp, path, ec);
    if (ec) note = "cannot write the peak cache " + path + " (" + ec.message() + ")";
  }
  return out;
}

std::int64_t useful_pairs(const attn_params& p) {
  if (!p.mask && !p.blocks) return mask_area(p);  // causal or dense: closed form per row
  const bool per_head = p.blocks || p.mask->uses_head();
  const bool per_batch = p.blocks || p.cu_seqlens_q || p.mask->uses_batch();
  const std::int64_t batches = per_batch ? p.batch : 1, heads = per_head ? p.heads_q : 1;
  std::int64_t area = 0;
  for (std::int64_t b = 0; b < batches; ++b) {
    const seq_extent e = sequence(p, b);
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < e.q_len; ++i)
        for (std::int64_t k0 = 0; k0 < e.k_len; k0 += 64)
          area += std::popcount(row_allowed_bits(p, b, h, i, k0, std::min<std::int64_t>(64, e.k_len - k0), e.q_len, e.k_len));
  }
  return area * (per_head ? 1 : p.heads_q) * (per_batch ? 1 : p.batch);
}

check_result check_sampled_rows(const attn_params& p, int max_rows) {
  using detail::load_element;
  check_result r;
  if (p.score || p.rope || p.sink_logits || p.blocks) {
    r.skipped = "score modifiers, RoPE, sinks and block masks are not in the sampled check";
    return r;
  }
  // Keep the check cheap: about 2e7 element loads at most.
  const double per_row = static_cast<double>(p.seq_k) * static_cast<double>(p.dim_qk + p.dim_v) + 1.0;
  const int rows = std::clamp(static_cast<int>(2e7 / per_row), 8, std::max(8, max_rows));
  std::vector<double> qv(static_cast<std::size_t>(p.dim_qk)), acc(static_cast<std::size_t>(p.dim_v));
  std::vector<double> s;
  std::vector<std::int64_t> keys;
  double max_ref = 0.0;
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  for (int r_i = 0; r_i < rows; ++r_i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const std::int64_t b = r_i % p.batch;
    const seq_extent e = sequence(p, b);
    if (e.q_len == 0) continue;
    const std::int64_t h = static_cast<std::int64_t>((state >> 20) % static_cast<std::uint64_t>(p.heads_q));
    const std::int64_t random_row = static_cast<std::int64_t>((state >> 33) % static_cast<std::uint64_t>(e.q_len));
    const std::int64_t i = r_i == 0 ? 0 : r_i == 1 ? e.q_len - 1 : random_row;
    const std::int64_t kvh = h / p.group;
    const std::int64_t q_row = e.tensor_batch * p.q_stride[0] + (e.q_begin + i) * p.q_stride[1] + h * p.q_stride[2];
    for (std::int64_t d = 0; d < p.dim_qk; ++d)
      qv[static_cast<std::size_t>(d)] = load_element(p.q, p.in_type, q_row + d * p.q_stride[3]);
    s.clear();
    keys.clear();
    double mx = -INFINITY;
    for (std::int64_t j = 0; j < e.k_len; ++j) {
      if (!element_allowed(p, b, h, i, j, e.q_len, e.k_len)) continue;
      const std::int64_t k_row = e.tensor_batch * p.k_stride[0] + (e.k_begin + j) * p.k_stride[1] + kvh * p.k_stride[2];
      double dot = 0.0;
      for (std::int64_t d = 0; d < p.dim_qk; ++d)
        dot += qv[static_cast<std::size_t>(d)] * load_element(p.k, p.in_type, k_row + d * p.k_stride[3]);
      s.push_back(dot * p.scale);
      keys.push_back(j);
      mx = std::max(mx, s.back());
    }
    std::fill(acc.begin(), acc.end(), 0.0);
    double sum = 0.0;
    for (std::size_t t = 0; t < s.size(); ++t) {
      const double w = std::exp(s[t] - mx);
      sum += w;
      const std::int64_t v_row = e.tensor_batch * p.v_stride[0] + (e.k_begin + keys[t]) * p.v_stride[1] + kvh * p.v_stride[2];
      for (std::int64_t d = 0; d < p.dim_v; ++d)
        acc[static_cast<std::size_t>(d)] += w * load_element(p.v, p.in_type, v_row + d * p.v_stride[3]);
    }
    const std::int64_t o_row = e.tensor_batch * p.o_stride[0] + (e.q_begin + i) * p.o_stride[1] + h * p.o_stride[2];
    for (std::int64_t d = 0; d < p.dim_v; ++d) {
      const double ref = sum > 0.0 ? acc[static_cast<std::size_t>(d)] / sum : 0.0;
      const double got = load_element(p.out, p.out_type, o_row + d * p.o_stride[3]);
      const double err = std::isnan(got) ? INFINITY : std::fabs(got - ref);
      r.max_abs_err = std::max(r.max_abs_err, err);
      max_ref = std::max(max_ref, std::fabs(ref));
    }
    ++r.rows;
  }
  // fp32 accumulation error over long rows plus the output dtype's rounding.
  r.tolerance = 1e-4 * std::max(1.0, max_ref) + 2.0 * dtype_epsilon(p.out_type) * max_ref;
  r.ok = r.max_abs_err <= r.tolerance;
  return r;
}

namespace {

// The rows [begin, begin + len) of one (tensor batch, head) of a tensor in fp64, row-major [len][dim].
std::vector<double> rows_fp64(const void* data, dtype t, const std::int64_t* st, std::int64_t tensor_batch, std::int64_t begin,
                              std::int64_t len, std::int64_t head, std::int64_t dim) {
  std::vector<double> out(static_cast<std::size_t>(len * dim));
  for (std::int64_t r = 0; r < len; ++r)
    for (std::int64_t d = 0; d < dim; ++d)
      out[static_cast<std::size_t>(r * dim + d)] =
          detail::load_element(data, t, tensor_batch * st[0] + (begin + r) * st[1] + head * st[2] + d * st[3]);
  return out;
}

// Four partial sums: the check's inner loop, bound by the FMA latency otherwise.
double dot_fp64(const double* a, const double* b, std::int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  std::int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < n; ++d) s0 += a[d] * b[d];
  return (s0 + s1) + (s2 + s3);
}

// One query row of the backward in fp64: its allowed keys with P_ij and dP_ij = <dO_i, v_j>, lse_i and
// D_i = sum_j P_ij dP_ij (lse -inf and D 0 for a row without allowed keys). k, v: the rows of its sequence and kv head.
struct query_row {
  std::vector<std::int64_t> keys;
  std::vector<double> pr, dp;
  double lse = -INFINITY, delta = 0;
};

void backward_query_row(const attn_params& p, std::int64_t b, std::int64_t h, std::int64_t i, const seq_extent& e, const double* qi,
                        const double* doi, const std::vector<double>& k, const std::vector<double>& v, query_row& r) {
  r.keys.clear();
  r.pr.clear();
  r.dp.clear();
  r.lse = -INFINITY;
  r.delta = 0;
  double mx = -INFINITY;
  for (std::int64_t k0 = 0; k0 < e.k_len; k0 += 64) {  // the allowed keys, one row word (64 keys) at a time
    for (std::uint64_t bits = row_allowed_bits(p, b, h, i, k0, std::min<std::int64_t>(64, e.k_len - k0), e.q_len, e.k_len); bits;
         bits &= bits - 1) {
      const std::int64_t j = k0 + std::countr_zero(bits);
      r.keys.push_back(j);
      r.pr.push_back(p.scale * dot_fp64(qi, k.data() + j * p.dim_qk, p.dim_qk));
      mx = std::max(mx, r.pr.back());
    }
  }
  if (r.keys.empty()) return;
  double sum = 0;
  for (const double s : r.pr) sum += std::exp(s - mx);
  r.lse = mx + std::log(sum);
  for (std::size_t n = 0; n < r.keys.size(); ++n) {
    r.pr[n] = std::exp(r.pr[n] - r.lse);
    r.dp.push_back(dot_fp64(doi, v.data() + r.keys[n] * p.dim_v, p.dim_v));
    r.delta += r.pr[n] * r.dp.back();
  }
}

}  // namespace

check_result check_backward_sampled(const attn_bwd_params& bp, int max_rows, double max_key_work) {
  using detail::load_element;
  const attn_params& p = bp.fwd;
  check_result r;
  if (p.score || p.rope || p.sink_logits || p.blocks) {
    r.skipped = "score modifiers, RoPE, sinks and block masks are not in the sampled check";
    return r;
  }
  const std::int64_t dqk = p.dim_qk, dvd = p.dim_v;
  double max_ref = 0.0;
  const auto compare = [&](const void* data, dtype t, std::int64_t at, double ref) {
    const double got = load_element(data, t, at);
    r.max_abs_err = std::max(r.max_abs_err, std::isnan(got) ? INFINITY : std::fabs(got - ref));
    max_ref = std::max(max_ref, std::fabs(ref));
  };
  // dq on sampled query rows (each O(Lk (dqk + dv)), like the forward's check).
  const double per_row = static_cast<double>(p.seq_k) * static_cast<double>(dqk + dvd) + 1.0;
  const int rows = std::clamp(static_cast<int>(2e7 / per_row), 8, std::max(8, max_rows));
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  const auto next = [&] { return state = state * 6364136223846793005ull + 1442695040888963407ull; };
  std::vector<double> k, v;
  std::int64_t loaded_b = -1, loaded_kvh = -1;
  const auto load_kv = [&](std::int64_t b, std::int64_t kvh, const seq_extent& e) {
    if (b == loaded_b && kvh == loaded_kvh) return;
    k = rows_fp64(p.k, p.in_type, p.k_stride, e.tensor_batch, e.k_begin, e.k_len, kvh, dqk);
    v = rows_fp64(p.v, p.in_type, p.v_stride, e.tensor_batch, e.k_begin, e.k_len, kvh, dvd);
    loaded_b = b;
    loaded_kvh = kvh;
  };
  query_row qr;
  std::vector<double> dq(static_cast<std::size_t>(dqk));
  for (int r_i = 0; r_i < rows; ++r_i) {
    next();
    const std::int64_t b = r_i % p.batch;
    const seq_extent e = sequence(p, b);
    if (e.q_len == 0) continue;
    const std::int64_t h = static_cast<std::int64_t>((state >> 20) % static_cast<std::uint64_t>(p.heads_q));
    const std::int64_t i = r_i == 0 ? 0 : r_i == 1 ? e.q_len - 1 : static_cast<std::int64_t>((state >> 33) % static_cast<std::uint64_t>(e.q_len));
    load_kv(b, h / p.group, e);
    const std::vector<double> qi = rows_fp64(p.q, p.in_type, p.q_stride, e.tensor_batch, e.q_begin + i, 1, h, dqk);
    const std::vector<double> doi = rows_fp64(bp.d_out, bp.d_out_type, bp.do_stride, e.tensor_batch, e.q_begin + i, 1, h, dvd);
    backward_query_row(p, b, h, i, e, qi.data(), doi.data(), k, v, qr);
    std::fill(dq.begin(), dq.end(), 0.0);
    for (std::size_t n = 0; n < qr.keys.size(); ++n) {
      const double w = p.scale * qr.pr[n] * (qr.dp[n] - qr.delta);
      const double* kj = k.data() + qr.keys[n] * dqk;
      for (std::int64_t d = 0; d < dqk; ++d) dq[static_cast<std::size_t>(d)] += w * kj[d];
    }
    const std::int64_t at = e.tensor_batch * bp.dq_stride[0] + (e.q_begin + i) * bp.dq_stride[1] + h * bp.dq_stride[2];
    for (std::int64_t d = 0; d < dqk; ++d) compare(bp.dq, bp.dq_type, at + d * bp.dq_stride[3], dq[static_cast<std::size_t>(d)]);
    ++r.rows;
  }
  r.grads = "dq";
  // dk, dv on sampled key rows of one (sequence, kv head): lse_i and D_i of every query row of its group first.
  std::int64_t b = 0;
  while (b < p.batch && (sequence(p, b).q_len == 0 || sequence(p, b).k_len == 0)) ++b;
  if (b < p.batch) {
    const seq_extent e = sequence(p, b);
    const std::int64_t kvh = static_cast<std::int64_t>((next() >> 20) % static_cast<std::uint64_t>(p.heads_kv));
    std::int64_t allowed = 0;  // the pairs of the group's rows: what their lse and D cost
    for (std::int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h)
      for (std::int64_t i = 0; i < e.q_len; ++i)
        for (std::int64_t k0 = 0; k0 < e.k_len; k0 += 64)
          allowed += std::popcount(row_allowed_bits(p, b, h, i, k0, std::min<std::int64_t>(64, e.k_len - k0), e.q_len, e.k_len));
    const double work = static_cast<double>(allowed) * static_cast<double>(dqk + dvd);
    if (work > max_key_work) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "dq (dk, dv not checked: %.3g multiply-adds for a kv head's lse and D, over %.3g)", work,
                    max_key_work);
      r.grads = buf;
    } else {
      load_kv(b, kvh, e);
      const std::int64_t group = p.group, lq = e.q_len;
      std::vector<std::vector<double>> q(static_cast<std::size_t>(group)), d_o(static_cast<std::size_t>(group));
      for (std::int64_t g = 0; g < group; ++g) {
        q[static_cast<std::size_t>(g)] = rows_fp64(p.q, p.in_type, p.q_stride, e.tensor_batch, e.q_begin, lq, kvh * group + g, dqk);
        d_o[static_cast<std::size_t>(g)] =
            rows_fp64(bp.d_out, bp.d_out_type, bp.do_stride, e.tensor_batch, e.q_begin, lq, kvh * group + g, dvd);
      }
      std::vector<double> lse(static_cast<std::size_t>(group * lq)), delta(lse.size());
#pragma omp parallel
      {
        query_row mine;
#pragma omp for schedule(dynamic, 16)
        for (std::int64_t gi = 0; gi < group * lq; ++gi) {
          const std::int64_t g = gi / lq, i = gi % lq;
          backward_query_row(p, b, kvh * group + g, i, e, q[static_cast<std::size_t>(g)].data() + i * dqk,
                             d_o[static_cast<std::size_t>(g)].data() + i * dvd, k, v, mine);
          lse[static_cast<std::size_t>(gi)] = mine.lse;
          delta[static_cast<std::size_t>(gi)] = mine.delta;
        }
      }
      const int keys = static_cast<int>(std::min<std::int64_t>(std::max(4, max_rows / 4), e.k_len));
      std::vector<double> dk(static_cast<std::size_t>(dqk)), dv(static_cast<std::size_t>(dvd));
      for (int k_i = 0; k_i < keys; ++k_i) {
        next();
        const std::int64_t j = k_i == 0 ? 0 : k_i == 1 ? e.k_len - 1 : static_cast<std::int64_t>((state >> 33) % static_cast<std::uint64_t>(e.k_len));
        const double* kj = k.data() + j * dqk;
        const double* vj = v.data() + j * dvd;
        std::fill(dk.begin(), dk.end(), 0.0);
        std::fill(dv.begin(), dv.end(), 0.0);
        for (std::int64_t g = 0; g < group; ++g)
          for (std::int64_t i = 0; i < lq; ++i) {
            const double l = lse[static_cast<std::size_t>(g * lq + i)];
            if (l == -INFINITY || !element_allowed(p, b, kvh * group + g, i, j, e.q_len, e.k_len)) continue;
            const double* qi = q[static_cast<std::size_t>(g)].data() + i * dqk;
            const double* doi = d_o[static_cast<std::size_t>(g)].data() + i * dvd;
            const double pr = std::exp(p.scale * dot_fp64(qi, kj, dqk) - l);
            const double w = p.scale * pr * (dot_fp64(doi, vj, dvd) - delta[static_cast<std::size_t>(g * lq + i)]);
            for (std::int64_t d = 0; d < dvd; ++d) dv[static_cast<std::size_t>(d)] += pr * doi[d];
            for (std::int64_t d = 0; d < dqk; ++d) dk[static_cast<std::size_t>(d)] += w * qi[d];
          }
        const std::int64_t at_k = e.tensor_batch * bp.dk_stride[0] + (e.k_begin + j) * bp.dk_stride[1] + kvh * bp.dk_stride[2];
        const std::int64_t at_v = e.tensor_batch * bp.dv_stride[0] + (e.k_begin + j) * bp.dv_stride[1] + kvh * bp.dv_stride[2];
        for (std::int64_t d = 0; d < dqk; ++d) compare(bp.dk, bp.dk_type, at_k + d * bp.dk_stride[3], dk[static_cast<std::size_t>(d)]);
        for (std::int64_t d = 0; d < dvd; ++d) compare(bp.dv, bp.dv_type, at_v + d * bp.dv_stride[3], dv[static_cast<std::size_t>(d)]);
        ++r.rows;
      }
      r.grads = "dq,dk,dv";
    }
  }
  const double eps = std::max({dtype_epsilon(bp.dq_type), dtype_epsilon(bp.dk_type), dtype_epsilon(bp.dv_type)});
  r.tolerance = 1e-4 * std::max(1.0, max_ref) + 2.0 * eps * max_ref;
  r.ok = r.max_abs_err <= r.tolerance;
  return r;
}

}  // namespace omniattn::bench
