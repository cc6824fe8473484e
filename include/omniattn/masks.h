// omniattn: attention masks as composable expressions.
//
// A mask answers "may query i of head h in sequence b attend to key j?" (i, j are positions inside the sequence,
// lq / lk the sequence lengths). Built-in patterns are small closed forms; and (&), or (|) and not (~) compose them;
// a user predicate mask(b, h, q, k) -> bool joins the same tree. The same expression object serves three readers:
//   allows()   one element                          (the oracle, exact evaluation)
//   row_bits() one query row over up to 64 keys     (the kernels' PARTIAL tiles: one word per row, not 64 calls)
//   classify() a whole tile: FULL / PARTIAL / EMPTY (block masks; closed form for the built-ins, exact always)
//
// Built-in patterns (align = causal alignment: bottom_right puts the last query on the last key, offset = lk - lq;
// top_left uses offset 0; FlashAttention >= 2.1 and this library default to bottom_right):
//   full()                       every pair
//   causal(align)                j <= i + offset
//   window(left, right, align)   i + offset - left <= j <= i + offset + right   (FlashAttention's window_size;
//                                left or right < 0 means unbounded on that side)
//   sinks(n)                     j < n                     (StreamingLLM attention sinks; combine: window | sinks)
//   prefix_lm(n, align)          j < n  or  j <= i + offset (bidirectional prefix of n tokens, causal after it)
//   document(offsets)            i and j in the same document; offsets = cumulative lengths [0, ..., L]
//   block_causal(block)          j / block <= i / block    (bidirectional inside blocks of `block` tokens)
//   dilated(dilation)            (j - i) % dilation == 0
//   segments(ids)                ids[i] == ids[j]          (segment-bidirectional, e.g. PINE; ids per position; Group
//                                Pose's two group attentions are segments(instance) and segments(type))
//   global_tokens(n)             i < n or j < n            (global / landmark tokens at the front: they see and are seen)
//   mutual(ids, a, b)            ids[i] == a and ids[j] == b  (modality-mutual, AKI: causal | mutual(ids, image, text)
//                                lets image tokens also read later text)
//   random_blocks(block, density, seed)  tile (i / block, j / block) kept with probability density, by a seeded hash
//                                (BigBird's random attention; combine with window and global_tokens)
//   neighborhood(grid, kernel, dilation, causal, stride)   NATTEN's neighborhood attention (NA / dilated NA / causal
//                                NA / strided NA, as in NATTEN's reference mask and "Generalized Neighborhood Attention",
//                                arXiv 2504.16922) over a row-major token grid of rank 1..3: i, j are raster indices
//                                (the last axis is contiguous), so the layouts [batch, X*Y*Z, heads, dim] and NATTEN's
//                                [batch, X, Y, Z, heads, dim] number tokens alike. Per axis, for a grid length n and a
//                                query coordinate x, key coordinate y:
//                                  dilation d: tokens form d groups by x % d; a query sees only its own group, in which
//                                    it has coordinate q = x / d and the group length is len = ceil((n - x % d) / d);
//                                    the key's group coordinate is k = y / d.
//                                  stride s: queries q with the same q / s share one window, the window of their
//                                    "leader": non-causal, the centre query L = min((q / s) * s + s / 2, len - 1);
//                                    causal, the last one L = min((q / s) * s + s - 1, len - 1).
//                                  kernel w, non-causal: keys [start, start + w) with
//                                    start = clamp(L - w / 2, 0, len - w): the window is shifted, not clipped, at a
//                                    border, so every query sees exactly w keys per axis (even w: w / 2 left of L,
//                                    w / 2 - 1 right).
//                                  kernel w, causal: keys [max(L - w + 1, 0), q]: it ends at the query itself (not at
//                                    the leader), so a query sees between 1 and w keys per axis.
//                                A pair is allowed iff it is allowed on every axis. Parameters are per axis; an empty
//                                vector means the default (dilation 1, stride 1, not causal), a single value applies to
//                                every axis. Valid: 1 <= w, d >= 1, w * d <= n, 1 <= s <= w (NATTEN's rules), grid
//                                tokens <= 2^40. Special cases: w = n (d = 1, not causal) is dense attention on that axis;
//                                s = w (non-causal, d = 1) is blocked, Swin-style window attention when w divides n (the
//                                last, partial block otherwise shares the window of the final w tokens); s = 1 is plain
//                                NA. Queries or keys at raster index >= the grid's token count see / are seen by nothing.
//   halo(grid, block, halo)      HaloNet's blocked local attention over the same row-major grid (rank 1..3): per axis
//                                queries form blocks of `block` coordinates (the last one partial when block does not
//                                divide n); a query in block [b0, b0 + block) sees keys [b0 - halo, b0 + block + halo)
//                                clipped to [0, n) (HaloNet pads with masked zeros, i.e. clipping). Valid: 1 <= block <= n,
//                                0 <= halo. halo = 0 is non-overlapping block attention.
//   dense(data, shape, strides)  a boolean table: data[b * s0 + h * s1 + i * s2 + j * s3] != 0, with shape [B, H, Lq, Lk]
//                                where a size-1 dimension broadcasts (its index and stride are ignored). The data is
//                                BORROWED: the caller keeps it alive and unchanged while the expression (or a copy of it,
//                                e.g. in a spec) is used. h is the query head, b the batch entry (the sequence index for
//                                varlen batches); an index past a dimension of size > 1 is not allowed.
//   predicate(f)                 f(b, h, i, j)             (user code; evaluated exactly, never guessed)
//   inlined(f)                   f(b, h, i, j)             (the same, compiled into a row loop: see below)
//
// User predicates. predicate(f) (and the implicit conversion from a lambda) stores f behind a std::function, so the
// kernels' PARTIAL tiles and classify() pay one type-erased call per key: 64 per row of a tile. inlined(f) keeps that
// element function for allows() (the oracle) and adds a row function, instantiated in the caller's translation unit,
// whose loop over up to 64 keys calls f directly: the compiler inlines f into it (and can vectorize it), and
// row_bits() / classify() pay one type-erased call per row and 64-key chunk instead of 64. Both compose with & | ~,
// print their name in str(), and make uses_head() / uses_batch() true (f may read h and b). f must be a pure,
// thread-safe function of its arguments (the kernel calls it from several threads, for keys a composed pattern then
// drops, and more than once per pair), e.g.
//   s.mask = mask_expr::causal(causal_mode::bottom_right) &
//            mask_expr::inlined([](auto, auto, auto q, auto k) { return (q ^ k) % 3 != 0; }, "xor3");
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace omniattn {

enum class causal_mode : std::uint8_t;
enum class tile_kind : std::uint8_t;

using mask_fn = std::function<bool(std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k)>;
// Allowed-key bits of query i over keys k0 .. k0 + n - 1 (bit t for key k0 + t, n <= 64, bits at or above n zero).
using mask_row_fn =
    std::function<std::uint64_t(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0, std::int64_t n)>;

class mask_expr {
 public:
  mask_expr() = default;  // no mask: every pair allowed (operator bool is false)
  // A user predicate, e.g. s.mask = [](auto b, auto h, auto q, auto k) { return (q ^ k) % 3 != 0; };
  template <class F>
    requires(!std::is_same_v<std::decay_t<F>, mask_expr> &&
             std::is_invocable_r_v<bool, F, std::int64_t, std::int64_t, std::int64_t, std::int64_t>)
  mask_expr(F f) : mask_expr(predicate(mask_fn(std::move(f)))) {}  // NOLINT: implicit by design

  static mask_expr full();
  static mask_expr causal(causal_mode align);
  static mask_expr window(std::int64_t left, std::int64_t right, causal_mode align);
  static mask_expr sinks(std::int64_t n);
  static mask_expr prefix_lm(std::int64_t n, causal_mode align);
  static mask_expr document(std::vector<std::int64_t> offsets);
  static mask_expr block_causal(std::int64_t block);
  static mask_expr dilated(std::int64_t dilation);
  static mask_expr segments(std::vector<std::int64_t> ids);
  static mask_expr global_tokens(std::int64_t n);
  static mask_expr mutual(std::vector<std::int64_t> ids, std::int64_t a, std::int64_t b);
  static mask_expr random_blocks(std::int64_t block, double density, std::uint64_t seed);
  // NATTEN's neighborhood attention (documented above); stride comes last so that calls written before it keep working.
  static mask_expr neighborhood(std::vector<std::int64_t> grid, std::vector<std::int64_t> kernel,
                                std::vector<std::int64_t> dilation = {}, std::vector<bool> causal = {},
                                std::vector<std::int64_t> stride = {});
  static mask_expr halo(std::vector<std::int64_t> grid, std::vector<std::int64_t> block, std::vector<std::int64_t> halo);
  // A borrowed boolean table [B, H, Lq, Lk] (strides in bytes = elements; size-1 dimensions broadcast). Borrowed, not
  // copied, because masks here are views like the q / k / v tensors: a B*H*Lq*Lk table can be gigabytes, Python passes
  // numpy / torch bool arrays zero-copy, and the caller already manages the lifetime of every other operand.
  static mask_expr dense(const std::uint8_t* data, std::array<std::int64_t, 4> shape, std::array<std::int64_t, 4> strides,
                         std::string name = "dense");
  static mask_expr predicate(mask_fn f, std::string name = "predicate");
  // A user predicate compiled into a row loop (documented above), e.g. mask_expr::inlined([](auto b, auto h, auto q,
  // auto k) { return (q ^ k) % 3 != 0; }). Same results as predicate(f, name) in every reader.
  template <class F>
    requires std::is_invocable_r_v<bool, const F&, std::int64_t, std::int64_t, std::int64_t, std::int64_t>
  static mask_expr inlined(F f, std::string name = "inlined") {
    mask_fn element = [f](std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k) -> bool {
      return static_cast<bool>(f(b, h, q, k));
    };
    mask_row_fn row = [f = std::move(f)](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0,
                                         std::int64_t n) -> std::uint64_t {
      // f called directly in a straight loop: after inlining, the compiler sees the whole body per key.
      std::uint64_t bits = 0;
      for (std::int64_t t = 0; t < n; ++t) bits |= static_cast<std::uint64_t>(static_cast<bool>(f(b, h, i, k0 + t))) << t;
      return bits;
    };
    return predicate_rows(std::move(element), std::move(row), std::move(name));
  }

  // a & b & c and a | b | c are single n-ary nodes (however they are grouped), so a chain of any length is one
  // level deep. The left operand is taken by value: `m = std::move(m) | x` extends m in place, in time linear in x.
  friend mask_expr operator&(mask_expr a, const mask_expr& b);
  friend mask_expr operator|(mask_expr a, const mask_expr& b);
  friend mask_expr operator~(mask_expr a);

  explicit operator bool() const { return root_ >= 0; }

  // Nesting depth: 0 for no mask, 1 for a pattern, 1 + the deepest child for &, | and ~. Every reader recurses once
  // per level, so deeper expressions are invalid: check() reports them, and allows(), row_bits() and classify()
  // answer "nothing allowed" for them instead of exhausting the stack (parse_mask rejects them with the same limit).
  static constexpr int max_depth = 200;
  int depth() const { return depth_; }

  bool allows(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, std::int64_t lq, std::int64_t lk) const;
  // Bit t set iff key k0 + t is allowed, for t < n <= 64; bits at or above n are zero.
  std::uint64_t row_bits(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0, std::int64_t n, std::int64_t lq,
                         std::int64_t lk) const;
  // Exact class of the tile [q0, q1) x [k0, k1) (both non-empty, inside the sequence).
  tile_kind classify(std::int64_t b, std::int64_t h, std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1,
                     std::int64_t lq, std::int64_t lk) const;
  // Whether the answer can change with the head / batch index (only user predicates can).
  bool uses_head() const;
  bool uses_batch() const;
  // Whether a user predicate is part of the expression (user code can throw: such calls stage their output).
  bool has_user_code() const;
  // A readable form, e.g. "((causal(bottom_right) & window(256,0,bottom_right)) | sinks(4))": every & and | in
  // parentheses, so its nesting equals depth() and, for an expression of built-in patterns, parse_mask reads it back.
  std::string str() const;
  // Empty when the expression is valid; otherwise what is wrong (e.g. "window: left -3 ... ").
  std::string check() const;
  // check(), plus the dense tables' shapes against a problem: each dimension equal to the problem's or 1.
  std::string check(std::int64_t batch, std::int64_t heads_q, std::int64_t seq_q, std::int64_t seq_k) const;

  enum class op : std::uint8_t { full, causal, window, sinks, prefix_lm, document, block_causal, dilated, segments,
                                 global_tokens, mutual, random_blocks, neighborhood, predicate, and_, or_, not_, halo, dense };
  struct node {
    op kind = op::full;
    std::int64_t a = 0, b = 0;  // pattern parameters (random_blocks: a = block, b = density in ppm)
    std::uint8_t align = 0;     // causal_mode as a number
    // Children of and / or (any number, in order) and not (one): `first`, then each child's `next`. `last` lets an
    // operator append a child without walking the list.
    int first = -1, last = -1;
    int next = -1;              // the following child of the same and / or; -1 for the last one
    int table = -1;             // index into tables_ (offsets, ids, grid parameters), fns_ (predicate) or dense_ (dense)
    std::uint64_t seed = 0;     // random_blocks
  };
  // The root node and a node's table, for code that recognises a pattern (core/grid_local.h); null when empty.
  const node* root_node() const { return root_ >= 0 ? &nodes_[static_cast<std::size_t>(root_)] : nullptr; }
  const std::vector<std::int64_t>* table(int index) const { return tables_[static_cast<std::size_t>(index)].get(); }
  const node* node_at(int index) const { return index >= 0 ? &nodes_[static_cast<std::size_t>(index)] : nullptr; }
  // The borrowed tables of the dense() leaves, for validation (attention() rejects an output that overlaps one).
  struct dense_view {
    const std::uint8_t* data = nullptr;
    std::array<std::int64_t, 4> shape{}, strides{};  // strides of size-1 dimensions are stored as 0
    std::string name;
  };
  const std::vector<dense_view>& dense_tables() const { return dense_; }

 private:
  std::vector<node> nodes_;
  std::vector<std::shared_ptr<const std::vector<std::int64_t>>> tables_;
  std::vector<std::shared_ptr<const mask_fn>> fns_;
  std::vector<std::string> names_;  // predicate names, parallel to fns_
  std::vector<std::shared_ptr<const mask_row_fn>> rows_;  // row functions of inlined(), parallel to fns_ (null: none)
  std::vector<dense_view> dense_;
  int root_ = -1;
  int depth_ = 0;

  static mask_expr leaf(node n);
  static mask_expr predicate_rows(mask_fn f, mask_row_fn row, std::string name);  // a predicate with a row function
  static mask_expr join(op kind, mask_expr a, const mask_expr& b);  // a & b or a | b, flattened
  int append(const mask_expr& other);  // copies other's nodes in, returns its root's new index
  int next_child(int c) const { return nodes_[static_cast<std::size_t>(c)].next; }

  bool allows_node(int n, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, std::int64_t lq, std::int64_t lk) const;
  std::uint64_t bits_node(int n, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0, std::int64_t cnt,
                          std::int64_t lq, std::int64_t lk) const;
  tile_kind classify_node(int n, std::int64_t b, std::int64_t h, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                          std::int64_t k1, std::int64_t lq, std::int64_t lk) const;
  bool interval(const node& nd, std::int64_t i, std::int64_t lq, std::int64_t lk, std::int64_t& lo, std::int64_t& hi) const;
  void str_node(int n, std::ostream& os) const;
  std::uint64_t dense_bits(const dense_view& d, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0,
                           std::int64_t cnt) const;
};

// Parses a mask spec string into an expression. Grammar (whitespace ignored):
//   expr    := term ('|' term)*
//   term    := unary ('&' unary)*
//   unary   := '~' unary | '(' expr ')' | pattern
//   pattern := name | name '(' arg (',' arg)* ')'        arg := integer | top_left | bottom_right | tl | br
//   names   : full, causal[(align)], window(left[, right[, align]]), sinks(n), prefix_lm(n[, align]),
//             document(o0, o1, ...), block_causal(block), dilated(d), segments(id0, id1, ...), global_tokens(n),
//             random_blocks(block, density_percent, seed)
//   grid patterns take per-axis sizes "AxBxC" (one number applies to every axis), positionally in this order and/or
//   as key=value (positional ones first, each at most once; causal values are 0 or 1):
//             neighborhood(grid, kernel[, dilation[, stride[, causal]]])     halo(grid, block, halo)
//   e.g. "neighborhood(64x64, 7x7)", "neighborhood(grid=16x32x32, kernel=3x7x7, stride=1x2x2, causal=1x0x0)",
//   "halo(grid=64x64, block=8x8, halo=3)". str() prints every key, so its output parses back to itself.
// e.g. "causal & window(256, 0) | sinks(4)". Time is linear in the text; expressions nest at most
// mask_expr::max_depth levels (parentheses, '~', and an & inside an | each count; a chain of one operator counts
// once), so whatever parses is valid and its str() parses back to the same str(). On error returns a message naming
// the offending character's position (counted in characters, not bytes) and showing it under a caret; the message is
// valid UTF-8 whatever the text (bytes that are not UTF-8 are quoted as \xNN); `out` is untouched.
std::string parse_mask(std::string_view text, mask_expr& out);

}  // namespace omniattn
