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
//   neighborhood(grid, kernel, dilation, causal)   NATTEN's neighborhood attention over a row-major token grid of
//                                rank 1..3 (i, j are raster indices). Per axis, tokens are grouped by coordinate modulo
//                                dilation; inside its group a query at group coordinate c sees the kernel keys of the
//                                window [start, start + kernel) with start = clamp(c - kernel / 2, 0, n - kernel)
//                                (n = the group's length): the window is shifted, not clipped, at borders, so every
//                                query sees kernel keys per axis. A causal axis sees [c - kernel + 1, c] clipped at 0.
//                                kernel = grid size (dilation 1) is dense attention.
//   predicate(f)                 f(b, h, i, j)             (user code; evaluated exactly, never guessed)
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace omniattn {

enum class causal_mode : std::uint8_t;
enum class tile_kind : std::uint8_t;

using mask_fn = std::function<bool(std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t k)>;

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
  static mask_expr neighborhood(std::vector<std::int64_t> grid, std::vector<std::int64_t> kernel,
                                std::vector<std::int64_t> dilation = {}, std::vector<bool> causal = {});
  static mask_expr predicate(mask_fn f, std::string name = "predicate");

  friend mask_expr operator&(const mask_expr& a, const mask_expr& b);
  friend mask_expr operator|(const mask_expr& a, const mask_expr& b);
  friend mask_expr operator~(const mask_expr& a);

  explicit operator bool() const { return root_ >= 0; }

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
  // A readable form, e.g. "(causal(bottom_right) & window(256,0,bottom_right)) | sinks(4)".
  std::string str() const;
  // Empty when the expression is valid; otherwise what is wrong (e.g. "window: left -3 ... ").
  std::string check() const;

  enum class op : std::uint8_t { full, causal, window, sinks, prefix_lm, document, block_causal, dilated, segments,
                                 global_tokens, mutual, random_blocks, neighborhood, predicate, and_, or_, not_ };
  struct node {
    op kind = op::full;
    std::int64_t a = 0, b = 0;  // pattern parameters (random_blocks: a = block, b = density in ppm)
    std::uint8_t align = 0;     // causal_mode as a number
    int lhs = -1, rhs = -1;     // children of and / or / not
    int table = -1;             // index into tables_ (document offsets, segment ids) or fns_
    std::uint64_t seed = 0;     // random_blocks
  };

 private:
  std::vector<node> nodes_;
  std::vector<std::shared_ptr<const std::vector<std::int64_t>>> tables_;
  std::vector<std::shared_ptr<const mask_fn>> fns_;
  std::vector<std::string> names_;  // predicate names, parallel to fns_
  int root_ = -1;

  static mask_expr leaf(node n);
  static mask_expr combine(op kind, const mask_expr& a, const mask_expr* b);
  int append(const mask_expr& other);  // copies other's nodes in, returns its root's new index

  bool allows_node(int n, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, std::int64_t lq, std::int64_t lk) const;
  std::uint64_t bits_node(int n, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t k0, std::int64_t cnt,
                          std::int64_t lq, std::int64_t lk) const;
  tile_kind classify_node(int n, std::int64_t b, std::int64_t h, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                          std::int64_t k1, std::int64_t lq, std::int64_t lk) const;
  bool interval(const node& nd, std::int64_t i, std::int64_t lq, std::int64_t lk, std::int64_t& lo, std::int64_t& hi) const;
  std::string str_node(int n) const;
};

// Parses a mask spec string into an expression. Grammar (whitespace ignored):
//   expr    := term ('|' term)*
//   term    := unary ('&' unary)*
//   unary   := '~' unary | '(' expr ')' | pattern
//   pattern := name | name '(' arg (',' arg)* ')'        arg := integer | top_left | bottom_right | tl | br
//   names   : full, causal[(align)], window(left[, right[, align]]), sinks(n), prefix_lm(n[, align]),
//             document(o0, o1, ...), block_causal(block), dilated(d), segments(id0, id1, ...), global_tokens(n),
//             random_blocks(block, density_percent, seed)
// e.g. "causal & window(256, 0) | sinks(4)". On error returns a message naming the offending character's position
// and showing it under a caret; `out` is untouched.
std::string parse_mask(std::string_view text, mask_expr& out);

}  // namespace omniattn
