// The mask spec-string parser: a small recursive-descent parser over the grammar in include/omniattn/masks.h.
#include <cctype>
#include <charconv>
#include <string>
#include <vector>

#include "omniattn/masks.h"
#include "omniattn/spec.h"

namespace omniattn {
namespace {

struct parse_error {
  std::size_t pos;
  std::string what;
};

class parser {
 public:
  explicit parser(std::string_view text) : t_(text) {}

  mask_expr parse() {
    mask_expr m = expr();
    skip();
    if (i_ != t_.size()) fail("unexpected '" + std::string(1, t_[i_]) + "' (expected '&', '|' or the end)");
    return m;
  }

 private:
  std::string_view t_;
  std::size_t i_ = 0;
  int depth_ = 0;

  [[noreturn]] void fail(std::string what) const { throw parse_error{i_, std::move(what)}; }
  void skip() {
    while (i_ < t_.size() && std::isspace(static_cast<unsigned char>(t_[i_]))) ++i_;
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

  mask_expr expr() {
    mask_expr m = term();
    while (eat('|')) m = m | term();
    return m;
  }
  mask_expr term() {
    mask_expr m = unary();
    while (eat('&')) m = m & unary();
    return m;
  }
  mask_expr unary() {
    // Bounded nesting keeps hostile inputs (fuzzing, "((((...") from exhausting the stack.
    if (++depth_ > 200) fail("nesting deeper than 200");
    mask_expr m;
    if (eat('~')) {
      m = ~unary();
    } else if (eat('(')) {
      m = expr();
      expect(')');
    } else {
      m = pattern();
    }
    --depth_;
    return m;
  }

  std::string ident() {
    skip();
    const std::size_t start = i_;
    while (i_ < t_.size() && (std::isalnum(static_cast<unsigned char>(t_[i_])) || t_[i_] == '_')) ++i_;
    return std::string(t_.substr(start, i_ - start));
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
      if (i_ < t_.size() && (t_[i_] == '-' || std::isdigit(static_cast<unsigned char>(t_[i_])))) {
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

  void arity(const std::vector<arg>& a, std::size_t lo, std::size_t hi, const std::string& name, std::size_t pos) {
    if (a.size() < lo || a.size() > hi) {
      i_ = pos;
      fail(name + " takes " + (lo == hi ? std::to_string(lo) : std::to_string(lo) + " to " + std::to_string(hi)) +
           " argument(s), got " + std::to_string(a.size()));
    }
  }

  mask_expr pattern() {
    skip();
    const std::size_t pos = i_;
    const std::string name = ident();
    if (name.empty()) fail(i_ < t_.size() ? "unexpected '" + std::string(1, t_[i_]) + "' (expected a pattern name, '~' or '(')"
                                          : "unexpected end (expected a pattern name, '~' or '(')");
    const std::vector<arg> a = args();
    mask_expr m;
    if (name == "full") {
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
           "random_blocks)");
    }
    if (const std::string why = m.check(); !why.empty()) {
      i_ = pos;
      fail(why);
    }
    return m;
  }
};

}  // namespace

std::string parse_mask(std::string_view text, mask_expr& out) {
  try {
    out = parser(text).parse();
    return {};
  } catch (const parse_error& e) {
    std::string msg = "[spec] at " + std::to_string(e.pos) + ": " + e.what + "\n  " + std::string(text) + "\n  " +
                      std::string(e.pos, ' ') + "^";
    return msg;
  }
}

}  // namespace omniattn
