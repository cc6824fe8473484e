// The spec-string parsers: small recursive-descent parsers over the mask grammar (include/omniattn/masks.h) and the
// score grammar (README.md), sharing one lexer and one error format (position, text, caret).
#include <charconv>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "omniattn/masks.h"
#include "omniattn/scores.h"
#include "omniattn/spec.h"

namespace omniattn {
namespace {

struct parse_error {
  std::size_t pos;  // a byte offset into the text
  std::string what;
};

// Character classes in ASCII only: <cctype>'s depend on the C locale, where a byte of a multi-byte UTF-8 character can
// count as a letter or a space and so be split from the rest of its character.
bool is_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_letter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Bytes in the UTF-8 character starting at t[i]: 1 for ASCII, 2 to 4 for a well-formed multi-byte character, 0 for a
// byte that starts none (a continuation byte, an overlong form, a surrogate, a truncated sequence).
std::size_t utf8_length(std::string_view t, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(t[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) return 1;
  std::size_t n = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // the range of the second byte (narrower after E0, ED, F0, F4)
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (i + n > t.size() || byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k)
    if ((byte(i + k) & 0xc0) != 0x80) return 0;
  return n;
}

// The character at t[i] for a message: the whole UTF-8 character, or \xNN for a control character or a byte that
// starts none. Messages must stay valid UTF-8: Python, for one, cannot decode them otherwise and loses them.
std::string char_at(std::string_view t, std::size_t i) {
  const std::size_t n = utf8_length(t, i);
  const auto c = static_cast<unsigned char>(t[i]);
  if (n > 1 || (n == 1 && c >= 0x20 && c != 0x7f)) return std::string(t.substr(i, n));
  const char* const hex = "0123456789abcdef";
  return std::string("\\x") + hex[c >> 4] + hex[c & 15];
}

// Position, whitespace, punctuation and identifiers; every error is a parse_error at the current position.
class lexer {
 public:
  explicit lexer(std::string_view text) : t_(text) {}

 protected:
  std::string_view t_;
  std::size_t i_ = 0;

  [[noreturn]] void fail(std::string what) const { throw parse_error{i_, std::move(what)}; }
  // "unexpected 'c' (expected ...)" for the character at the current position, or "unexpected end (...)".
  [[noreturn]] void unexpected(const std::string& expected) const {
    fail(i_ < t_.size() ? "unexpected '" + char_at(t_, i_) + "' (" + expected + ")" : "unexpected end (" + expected + ")");
  }
  void skip() {
    while (i_ < t_.size() && is_space(t_[i_])) ++i_;
  }
  bool eat(char c) {
    skip();
    if (i_ < t_.size() && t_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  std::string ident() {
    skip();
    const std::size_t start = i_;
    while (i_ < t_.size() && (is_letter(t_[i_]) || is_digit(t_[i_]) || t_[i_] == '_')) ++i_;
    // "causälx" is one word to a reader: name the character rather than the unknown name "caus".
    if (i_ > start && i_ < t_.size() && static_cast<unsigned char>(t_[i_]) >= 0x80)
      unexpected("names are ASCII letters, digits and '_'");
    return std::string(t_.substr(start, i_ - start));
  }
  template <class Args>
  void arity(const Args& a, std::size_t lo, std::size_t hi, const std::string& name, std::size_t pos) {
    if (a.size() < lo || a.size() > hi) {
      i_ = pos;
      fail(name + " takes " + (lo == hi ? std::to_string(lo) : std::to_string(lo) + " to " + std::to_string(hi)) +
           " argument(s), got " + std::to_string(a.size()));
    }
  }
};

// "[spec] at N: what", the text, and a caret under the offending character. N and the caret's column count characters,
// not bytes, so both match what a reader sees (and Python's string indices); the text is shown with control characters
// as spaces and bytes that are not UTF-8 as '?', one column each, which keeps the caret aligned and the message valid
// UTF-8 whatever the input.
std::string format_error(std::string_view text, const parse_error& e) {
  std::string shown;
  std::size_t column = 0;
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t n = utf8_length(text, i);
    if (n == 0) shown += '?';
    else if (n == 1 && (static_cast<unsigned char>(text[i]) < 0x20 || text[i] == 0x7f)) shown += ' ';
    else shown.append(text.substr(i, n));
    if (i < e.pos) ++column;
    i += n == 0 ? 1 : n;
  }
  return "[spec] at " + std::to_string(column) + ": " + e.what + "\n  " + shown + "\n  " + std::string(column, ' ') + "^";
}

class parser : lexer {
 public:
  explicit parser(std::string_view text) : lexer(text) {}

  mask_expr parse() {
    mask_expr m = expr();
    skip();
    if (i_ != t_.size()) unexpected("expected '&', '|' or the end");
    return m;
  }

 private:
  int depth_ = 0;  // open unary() calls: the parser's own recursion

  // Both the parser's recursion and the tree it builds are bounded by mask_expr::max_depth, the limit check() puts on
  // every expression: hostile inputs ("((((...", "~~~~...") cannot exhaust the stack, and since str() nests exactly
  // as deep as the tree, whatever parses prints to a string that parses again.
  [[noreturn]] void too_deep(std::size_t at) {
    i_ = at;
    fail("expression nests deeper than " + std::to_string(mask_expr::max_depth));
  }
  mask_expr bounded(mask_expr m, std::size_t at) {
    if (m.depth() > mask_expr::max_depth) too_deep(at);
    return m;
  }

  // Operands join the left one in place (operator| / & take it by value), so a chain of n terms parses in O(n).
  mask_expr expr() {
    mask_expr m = term();
    for (;;) {
      skip();
      const std::size_t at = i_;  // the operator, where a too deep result is reported
      if (!eat('|')) return m;
      m = bounded(std::move(m) | term(), at);
    }
  }
  mask_expr term() {
    mask_expr m = unary();
    for (;;) {
      skip();
      const std::size_t at = i_;  // the operator, where a too deep result is reported
      if (!eat('&')) return m;
      m = bounded(std::move(m) & unary(), at);
    }
  }
  mask_expr unary() {
    skip();
    const std::size_t at = i_;
    if (++depth_ > mask_expr::max_depth) too_deep(at);
    mask_expr m;
    if (eat('~')) {
      m = bounded(~unary(), at);
    } else if (eat('(')) {
      m = expr();
      expect(')');
    } else {
      m = pattern();
    }
    --depth_;
    return m;
  }

  struct arg {
    bool is_int = false;
    std::int64_t value = 0;
    std::string word;
    std::size_t pos = 0;
  };

  std::vector<arg> args() {
    std::vector<arg> out;
    if (!eat('(')) return out;
    do {
      skip();
      arg a;
      a.pos = i_;
      if (i_ < t_.size() && (t_[i_] == '-' || is_digit(t_[i_]))) {
        const char* first = t_.data() + i_;
        const auto [ptr, ec] = std::from_chars(first, t_.data() + t_.size(), a.value);
        if (ec != std::errc()) fail("not a 64-bit integer");
        i_ += static_cast<std::size_t>(ptr - first);
        a.is_int = true;
      } else {
        a.word = ident();
        if (a.word.empty()) fail("expected a number or an alignment (top_left, bottom_right)");
      }
      out.push_back(a);
    } while (eat(','));
    expect(')');
    return out;
  }

  std::int64_t integer(const std::vector<arg>& a, std::size_t k, const char* name) {
    if (k >= a.size() || !a[k].is_int) {
      if (k < a.size()) i_ = a[k].pos;
      fail(std::string(name) + ": argument " + std::to_string(k + 1) + " must be an integer");
    }
    return a[k].value;
  }

  causal_mode alignment(const std::vector<arg>& a, std::size_t k) {
    if (k >= a.size()) return causal_mode::bottom_right;
    if (a[k].word == "bottom_right" || a[k].word == "br") return causal_mode::bottom_right;
    if (a[k].word == "top_left" || a[k].word == "tl") return causal_mode::top_left;
    i_ = a[k].pos;
    fail("expected an alignment: top_left, tl, bottom_right or br");
  }

  // Per-axis sizes "A" or "AxBxC" (at most 3 axes: grids have rank 1..3).
  std::vector<std::int64_t> sizes(const std::string& name) {
    std::vector<std::int64_t> out;
    do {
      skip();
      if (i_ >= t_.size() || !(t_[i_] == '-' || is_digit(t_[i_])))
        fail(name + ": expected per-axis sizes, e.g. 7 or 7x7");
      if (out.size() == 3) fail(name + ": more than 3 axes");
      std::int64_t v = 0;
      const char* first = t_.data() + i_;
      const auto [ptr, ec] = std::from_chars(first, t_.data() + t_.size(), v);
      if (ec != std::errc()) fail("not a 64-bit integer");
      i_ += static_cast<std::size_t>(ptr - first);
      out.push_back(v);
    } while (eat('x'));
    return out;
  }

  // neighborhood(grid, kernel[, dilation[, stride[, causal]]]) and halo(grid, block, halo): values positionally in this
  // order and/or as key=value, positional ones first, each at most once.
  mask_expr grid_pattern(const std::string& name, std::size_t pos) {
    const bool nb = name == "neighborhood";
    const std::vector<std::string> keys =
        nb ? std::vector<std::string>{"grid", "kernel", "dilation", "stride", "causal"} : std::vector<std::string>{"grid", "block", "halo"};
    std::vector<std::vector<std::int64_t>> values(keys.size());
    std::vector<bool> given(keys.size(), false);
    expect('(');
    std::size_t next = 0;
    bool keyword_seen = false;
    do {
      skip();
      const std::size_t at = i_;
      std::size_t slot = 0;
      if (i_ < t_.size() && is_letter(t_[i_])) {
        const std::string key = ident();
        while (slot < keys.size() && keys[slot] != key) ++slot;
        if (slot == keys.size()) {
          std::string known;
          for (const std::string& k : keys) known += (known.empty() ? "" : " ") + k;
          i_ = at;
          fail(name + ": unknown key '" + key + "' (known: " + known + ")");
        }
        expect('=');
        keyword_seen = true;
      } else {
        if (keyword_seen) fail(name + ": a positional value after key=value ones");
        if (next == keys.size()) fail(name + " takes at most " + std::to_string(keys.size()) + " values");
        slot = next++;
      }
      if (given[slot]) {
        i_ = at;
        fail(name + ": " + keys[slot] + " given twice");
      }
      given[slot] = true;
      values[slot] = sizes(name);
    } while (eat(','));
    expect(')');
    for (std::size_t k = 0; k < (nb ? 2u : 3u); ++k)
      if (!given[k]) {
        i_ = pos;
        fail(name + ": " + keys[k] + " is required");
      }
    if (!nb) return mask_expr::halo(values[0], values[1], values[2]);
    std::vector<bool> causal;
    for (std::int64_t c : values[4]) {
      if (c != 0 && c != 1) {
        i_ = pos;
        fail("neighborhood: causal values must be 0 or 1");
      }
      causal.push_back(c == 1);
    }
    return mask_expr::neighborhood(values[0], values[1], values[2], causal, values[3]);
  }

  mask_expr pattern() {
    skip();
    const std::size_t pos = i_;
    const std::string name = ident();
    if (name.empty()) unexpected("expected a pattern name, '~' or '('");
    const bool grid = name == "neighborhood" || name == "halo";  // per-axis sizes and key=value: their own arguments
    const std::vector<arg> a = grid ? std::vector<arg>{} : args();
    mask_expr m;
    if (grid) {
      m = grid_pattern(name, pos);
    } else if (name == "full") {
      arity(a, 0, 0, name, pos);
      m = mask_expr::full();
    } else if (name == "causal") {
      arity(a, 0, 1, name, pos);
      m = mask_expr::causal(alignment(a, 0));
    } else if (name == "window") {
      arity(a, 1, 3, name, pos);
      m = mask_expr::window(integer(a, 0, "window"), a.size() > 1 ? integer(a, 1, "window") : 0, alignment(a, 2));
    } else if (name == "sinks") {
      arity(a, 1, 1, name, pos);
      m = mask_expr::sinks(integer(a, 0, "sinks"));
    } else if (name == "prefix_lm") {
      arity(a, 1, 2, name, pos);
      m = mask_expr::prefix_lm(integer(a, 0, "prefix_lm"), alignment(a, 1));
    } else if (name == "block_causal") {
      arity(a, 1, 1, name, pos);
      m = mask_expr::block_causal(integer(a, 0, "block_causal"));
    } else if (name == "dilated") {
      arity(a, 1, 1, name, pos);
      m = mask_expr::dilated(integer(a, 0, "dilated"));
    } else if (name == "global_tokens") {
      arity(a, 1, 1, name, pos);
      m = mask_expr::global_tokens(integer(a, 0, "global_tokens"));
    } else if (name == "random_blocks") {
      arity(a, 3, 3, name, pos);
      const std::int64_t percent = integer(a, 1, "random_blocks");
      if (percent < 0 || percent > 100) {
        i_ = a[1].pos;
        fail("random_blocks: density must be a percentage 0..100");
      }
      m = mask_expr::random_blocks(integer(a, 0, "random_blocks"), static_cast<double>(percent) / 100.0,
                                   static_cast<std::uint64_t>(integer(a, 2, "random_blocks")));
    } else if (name == "document" || name == "segments") {
      arity(a, 1, 1u << 20, name, pos);
      std::vector<std::int64_t> values;
      for (std::size_t k = 0; k < a.size(); ++k) values.push_back(integer(a, k, name.c_str()));
      m = name == "document" ? mask_expr::document(std::move(values)) : mask_expr::segments(std::move(values));
    } else {
      i_ = pos;
      fail("unknown pattern '" + name +
           "' (known: full causal window sinks prefix_lm document block_causal dilated segments global_tokens "
           "random_blocks neighborhood halo)");
    }
    if (const std::string why = m.check(); !why.empty()) {
      i_ = pos;
      fail(why);
    }
    return m;
  }
};

// score := term ('+' term)*,  term := name ['(' number (',' number)* ')']: terms apply left to right (scores::then).
class score_parser : lexer {
 public:
  score_parser(std::string_view text, std::int64_t heads) : lexer(text), heads_(heads) {}

  score_fn parse() {
    score_fn chain = term();
    std::size_t terms = 1;
    while (eat('+')) {
      // Each term nests the chain one level deeper (evaluation and destruction recurse through it): bound it.
      if (++terms > k_max_terms) fail("more than " + std::to_string(k_max_terms) + " terms");
      score_fn next = term();
      if (!chain) chain = std::move(next);
      else if (next) chain = scores::then(std::move(chain), std::move(next));
    }
    skip();
    if (i_ != t_.size()) unexpected("expected '+' or the end");
    return chain;
  }

 private:
  static constexpr std::size_t k_max_terms = 64;
  // ALiBi offsets are key - query distances: far beyond any sequence, and small enough that k - q + offset cannot
  // overflow int64.
  static constexpr std::int64_t k_max_offset = std::int64_t{1} << 40;
  std::int64_t heads_;

  struct number {
    double value = 0.0;
    bool is_int = false;
    std::size_t pos = 0;
  };

  std::vector<number> args() {
    std::vector<number> out;
    if (!eat('(')) return out;
    do {
      skip();
      number a;
      a.pos = i_;
      const char* first = t_.data() + i_;
      const char* last = t_.data() + t_.size();
      const bool numeric = i_ < t_.size() && (t_[i_] == '-' || t_[i_] == '.' || is_digit(t_[i_]));
      // Only digits, '.', '-' may start a number: from_chars alone would also take "inf" and "nan".
      if (!numeric || (t_[i_] == '-' && (i_ + 1 >= t_.size() || !(t_[i_ + 1] == '.' || is_digit(t_[i_ + 1])))))
        fail("expected a number");
      const auto [ptr, ec] = std::from_chars(first, last, a.value);
      if (ec == std::errc::result_out_of_range) fail("number out of range");
      if (ec != std::errc()) fail("expected a number");
      const std::string_view token(first, static_cast<std::size_t>(ptr - first));
      a.is_int = token.find_first_of(".eE") == std::string_view::npos;
      i_ += token.size();
      out.push_back(a);
    } while (eat(','));
    expect(')');
    return out;
  }

  std::int64_t offset_arg(const std::vector<number>& a, std::size_t k, const std::string& name) {
    if (k >= a.size()) return 0;
    if (!a[k].is_int || std::fabs(a[k].value) > static_cast<double>(k_max_offset)) {
      i_ = a[k].pos;
      fail(name + ": the offset must be an integer with |offset| <= 2^40");
    }
    return static_cast<std::int64_t>(a[k].value);
  }

  score_fn term() {
    skip();
    const std::size_t pos = i_;
    const std::string name = ident();
    if (name.empty()) unexpected("expected a score modifier name");
    const std::vector<number> a = args();
    try {
      if (name == "none") {
        arity(a, 0, 0, name, pos);
        return {};
      }
      if (name == "alibi") {
        arity(a, 0, 1, name, pos);
        if (heads_ <= 0) {
          i_ = pos;
          fail("alibi: the standard slopes need the number of query heads (got " + std::to_string(heads_) + ")");
        }
        return scores::alibi(scores::alibi_slopes(heads_), offset_arg(a, 0, name));
      }
      if (name == "alibi_slope") {
        arity(a, 1, 2, name, pos);
        if (!std::isfinite(a[0].value)) {
          i_ = a[0].pos;
          fail("alibi_slope: the slope must be finite");
        }
        return scores::alibi({a[0].value}, offset_arg(a, 1, name));
      }
      if (name == "softcap") {
        arity(a, 1, 1, name, pos);
        return scores::softcap(a[0].value);
      }
      if (name == "temperature") {
        arity(a, 1, 1, name, pos);
        return scores::temperature({a[0].value});
      }
      if (name == "logn") {
        arity(a, 1, 1, name, pos);
        return scores::logn(a[0].value);
      }
    } catch (const std::invalid_argument& e) {
      // The constructors' own rule ("[scores::softcap] cap must be finite and > 0"), pointing at the argument.
      i_ = a.empty() ? pos : a[0].pos;
      fail(e.what());
    }
    i_ = pos;
    fail("unknown score modifier '" + name + "' (known: none alibi alibi_slope softcap temperature logn)");
  }
};

}  // namespace

std::string parse_mask(std::string_view text, mask_expr& out) {
  try {
    out = parser(text).parse();
    return {};
  } catch (const parse_error& e) {
    return format_error(text, e);
  }
}

std::string parse_score(std::string_view text, std::int64_t heads, score_fn& out) {
  try {
    out = score_parser(text, heads).parse();
    return {};
  } catch (const parse_error& e) {
    return format_error(text, e);
  }
}

}  // namespace omniattn
