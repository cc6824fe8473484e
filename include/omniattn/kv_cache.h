// omniattn: a paged KV cache and attention of new queries against it (decoding, chunked prefill, block decoding).
//
// Storage. Pages of page_size tokens, one page per (sequence, kv head) run of tokens, in the layout the kernels read
// in place (no packing per call): K transposed, [dim_qk][page_size], then V row-major, [page_size][dim_vp] (dim_v
// rounded up to 16 with zeros), in f32, bf16 or f16. Every sequence keeps, per kv head, a page table (a list of page
// ids) and every page the token index of each slot. Pages are reference-counted: fork() shares all pages of a
// sequence, and a shared page is copied before it changes (copy-on-write), so prefixes are stored once.
//
// Tokens. append() gives the new tokens the indices length .. length + n - 1 of their sequence; an index never
// changes, also when earlier tokens are evicted, so every mask pattern, score modifier and RoPE position means the
// same on a cache with evicted slots as on the full sequence. With kv_cache_config::rope the keys are stored rotated
// at their positions (the token index, or caller positions: re-aligned or multi-axis ids).
//
// Attention on the cache (attention_decode): the Lq new queries of sequence b are its last Lq tokens, indices
// L_b - Lq .. L_b - 1 (L_b = length(b): append their K / V first, as FlashInfer and vLLM do). Row i computes exactly
// what attention() computes for row L_b - Lq + i of the full sequence with Lq = Lk = L_b, except that keys no longer
// in the cache (evicted, truncated) are masked: out_i = sum_j softmax_j(s_ij) v_j over the cached keys j the spec
// allows. Rows with no allowed cached key give out 0 and lse -inf (lse = sink with sink logits).
//
// Eviction (memory is freed a page at a time; a page whose slots are all evicted returns to the free list):
//   eviction_policy{sinks, window}, per kv head, applied before each append: keeps the tokens that a query at index
//     >= length may still see under the mask `sinks(sinks) | window(window - 1, 0)` (StreamingLLM, LongLive): tokens
//     < sinks and tokens > length - window. window < 0 keeps everything (DuoAttention's retrieval heads).
//   keep_top_k(): keeps the k most-attended cached keys of one head (Recycled Attention), from the key mass that
//     attention_decode reports on request (decode_options::key_mass).
//   truncate(): drops tokens of index >= length (rollback, a re-run denoising step, speculative decoding).
// A cache is not thread-safe for modification; concurrent attention_decode calls on an unchanging cache are.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "omniattn/attention.h"
#include "omniattn/rope.h"
#include "omniattn/spec.h"
#include "omniattn/tensor.h"

namespace omniattn {

struct kv_cache_config {
  std::int64_t heads_kv = 0;
  std::int64_t dim_qk = 0;
  std::int64_t dim_v = 0;  // 0: dim_qk
  std::int64_t page_size = 16;  // tokens per page, 1 .. 4096; multiples of 16 are read in place, others per tile
  dtype storage = dtype::f32;   // f32, bf16 or f16
  // Rotate keys on append (theta, rotary_dim, interleaved, sections; its position arrays are ignored: positions come
  // with each append). attention_decode then requires spec.rope with the same parameters, applied to the queries.
  std::optional<rope_spec> rope;
};

struct eviction_policy {
  std::int64_t sinks = 0;    // the first tokens, always kept
  std::int64_t window = -1;  // keep the tokens a query may see under window(window - 1, 0); < 0: keep everything
};

// What the cache holds, in bytes: K / V data of the live pages, their slot indices and the page tables.
struct kv_cache_memory {
  std::int64_t pages_in_use = 0, pages_free = 0;
  std::int64_t page_bytes = 0;      // K / V data of one page
  std::int64_t data_bytes = 0;      // pages_in_use * page_bytes
  std::int64_t metadata_bytes = 0;  // slot indices, page tables, per-page counters
  std::int64_t tokens = 0;          // cached (sequence, kv head, token) slots that hold a token
};

// The plain view the kernels and the oracle read (pointers into the cache; valid until the cache changes).
struct kv_cache_view {
  dtype storage = dtype::f32;
  std::int64_t page_size = 0, heads_kv = 0, dim_qk = 0, dim_v = 0, dim_vp = 0;
  std::int64_t v_offset = 0;                       // elements from a page's start to its V block
  const void* const* page_data = nullptr;          // [page id]
  const std::int32_t* const* page_index = nullptr;  // [page id] -> page_size token indices (-1: no token)
  const std::int32_t* const* pages = nullptr;      // [sequence * heads_kv + kv head] -> page ids, in token order
  const std::int64_t* page_count = nullptr;        // [sequence * heads_kv + kv head]
  const std::int64_t* length = nullptr;            // [sequence]: tokens appended (next index)
  std::int64_t sequences = 0;
  const rope_spec* rope = nullptr;                 // the keys' rotation, or null
};

class kv_cache {
 public:
  // Throws std::invalid_argument("[kv_cache] ...") for a config that breaks a rule (see validate()).
  explicit kv_cache(const kv_cache_config& config);
  ~kv_cache();
  kv_cache(const kv_cache&) = delete;
  kv_cache& operator=(const kv_cache&) = delete;

  static status validate(const kv_cache_config& config);
  const kv_cache_config& config() const;

  std::int64_t add_sequence();                           // a new, empty sequence; returns its id
  status fork(std::int64_t seq, std::int64_t& new_seq);  // a new sequence sharing every page of seq
  status free_sequence(std::int64_t seq);                // its pages return to the free list (when unshared)
  // Appends n tokens: k [1, n, heads_kv, dim_qk], v [1, n, heads_kv, dim_v] (f32, bf16, f16; any strides).
  // positions: n RoPE position ids ([axes][n] with multi-axis sections), or null for the token indices.
  status append(std::int64_t seq, const tensor& k, const tensor& v, const std::int64_t* positions = nullptr);
  status truncate(std::int64_t seq, std::int64_t length);
  // Eviction policy of one kv head, or of every head with kv_head = -1; applies from the next append on.
  status set_eviction(std::int64_t kv_head, const eviction_policy& policy);
  // Keeps the k cached keys of (seq, kv_head) with the largest mass (one float per cached slot, in slot order, as
  // decode_options::key_mass reports them; ties keep the earlier token), compacted into fresh pages.
  status keep_top_k(std::int64_t seq, std::int64_t kv_head, std::span<const float> mass, std::int64_t k);
  status shrink();  // releases the free pages to the system

  std::int64_t sequences() const;  // ids handed out so far
  bool alive(std::int64_t seq) const;
  std::int64_t length(std::int64_t seq) const;                       // tokens appended, -1 for a bad id
  std::int64_t cached(std::int64_t seq, std::int64_t kv_head) const;  // slots holding a token, -1 for bad ids
  // The token indices of the cached slots of (seq, kv_head), in slot order (what key_mass entries refer to).
  std::vector<std::int64_t> cached_tokens(std::int64_t seq, std::int64_t kv_head) const;
  // Copies the cached K (as stored: rotated with RoPE) and V of (seq, kv_head) as float rows, in slot order.
  status read(std::int64_t seq, std::int64_t kv_head, std::vector<float>& k, std::vector<float>& v) const;
  kv_cache_memory memory() const;
  kv_cache_view view() const;

 private:
  struct impl;
  std::unique_ptr<impl> d_;
};

// ---- Attention of new queries against the cache ----
//
//   q    [batch, Lq, heads_q, dim_qk]   row b belongs to cache sequence seqs[b] (distinct ids); heads_q % heads_kv == 0
//   out  [batch, Lq, heads_q, dim_v]    f32 / bf16 / f16
//   lse  [batch, heads_q, Lq]           optional (options.lse)
// Ragged batches (continuous batching: prefill chunks and single decode tokens in one call, FlashInfer's qo_indptr):
// with decode_options::cu_seqlens_q, q / out are [1, total, heads, dim] and sequence seqs[b] owns rows
// [cu_seqlens_q[b], cu_seqlens_q[b + 1]), its last cu_seqlens_q[b + 1] - cu_seqlens_q[b] tokens (0 is allowed);
// lse is then [1, heads_q, total].
// The spec is the forward's (spec.h): masks, score modifiers, sink logits, block masks sized for the full sequence,
// RoPE (must match the cache's); mask and score functors see b = the index into seqs.
struct decode_options {
  backend use = backend::automatic;
  int threads = 0;  // 0: all cores (as options::threads)
  const lse_tensor* lse = nullptr;
  // Optional: the attention each cached key receives, [batch][heads_kv][key_mass_slots] floats: the sum over the
  // queries of the call and the q heads of the kv head's group of the probability of that key (slot order of
  // kv_cache::cached_tokens; entries past a head's cached slots are 0). One extra pass over the cache.
  float* key_mass = nullptr;
  std::int64_t key_mass_slots = 0;
  const std::int64_t* cu_seqlens_q = nullptr;  // optional: seqs.size() + 1 offsets into q's rows (ragged batch)
  run_stats* stats = nullptr;
  bool allow_fallback = true;
};

status attention_decode(const tensor& q, const kv_cache& cache, std::span<const std::int64_t> seqs, const tensor& out,
                        const spec& s = {}, const decode_options& opt = {});

// The params of one decode call (pointers, sizes, precomputed scalars), as the kernels and the oracle read them.
// fwd carries q, out, lse and the spec's scalars: batch (= sequences), seq_q = Lq (ragged: the most new queries of a
// sequence), seq_rows_q = q's rows, heads, dims; its k / v are null. A ragged call sets fwd.cu_seqlens_q, and
// fwd.cu_seqlens_k to the same array so that sequence(fwd, b) gives each sequence's query rows (its key fields are
// meaningless here: keys live in the cache).
struct attn_decode_params {
  attn_params fwd;
  kv_cache_view cache;
  const std::int64_t* seqs = nullptr;  // [batch] cache sequence ids
  float* key_mass = nullptr;
  std::int64_t key_mass_slots = 0;
};

status make_decode_params(const tensor& q, const kv_cache& cache, std::span<const std::int64_t> seqs, const tensor& out,
                          const spec& s, const decode_options& opt, attn_decode_params& p);

using decode_kernel_fn = void (*)(const attn_decode_params&);
struct decode_selection {
  decode_kernel_fn run = nullptr;
  std::string name;
  std::vector<std::string> reasons;
  bool ok() const { return run != nullptr; }
};
decode_selection select_decode(const attn_decode_params& p, backend b);

// The fp64 oracle on the cache view (plain loops over the cached slots).
void reference_attention_decode(const attn_decode_params& p);

}  // namespace omniattn
