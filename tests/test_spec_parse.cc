// The spec-string parsers (src/core/spec_parse.cc) on hostile inputs: long chains parse in linear time, nesting is
// bounded by mask_expr::max_depth with a clear error, whatever parses prints (str()) to a string that parses back to
// the same expression, and error messages are valid UTF-8 with positions counted in characters.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "omniattn/omniattn.h"

namespace omniattn {
namespace {

std::string repeat(const std::string& s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}

std::string joined(const std::string& term, const std::string& op, int n) {
  std::string out = term;
  for (int i = 1; i < n; ++i) out += op + term;
  return out;
}

// Parses `text`, expects success, and checks that str() parses back to the same str().
mask_expr parses_and_round_trips(const std::string& text) {
  mask_expr m;
  EXPECT_EQ(parse_mask(text, m), "") << text.substr(0, 200);
  const std::string printed = m.str();
  mask_expr again;
  EXPECT_EQ(parse_mask(printed, again), "") << printed.substr(0, 200);
  EXPECT_EQ(again.str(), printed);
  EXPECT_EQ(again.depth(), m.depth());
  return m;
}

// The error of parsing `text`; expects one.
std::string error_of(const std::string& text) {
  mask_expr m = mask_expr::sinks(7);
  const std::string err = parse_mask(text, m);
  EXPECT_FALSE(err.empty()) << text.substr(0, 200);
  EXPECT_EQ(m.str(), "sinks(7)") << "a failed parse changed its output";
  return err;
}

TEST(MaskSpec, HundredThousandTermChainsParseFlat) {
  // Before n-ary nodes: 20,000 terms took 6.8 s (quadratic copying) and 10,000 overflowed the stack when classified.
  const mask_expr any_of = parses_and_round_trips(joined("sinks(3)", "|", 100000));
  EXPECT_EQ(any_of.depth(), 2);
  EXPECT_EQ(any_of.check(), "");
  EXPECT_TRUE(any_of.allows(0, 0, 9, 2, 10, 10));
  EXPECT_FALSE(any_of.allows(0, 0, 9, 3, 10, 10));
  EXPECT_EQ(static_cast<int>(any_of.classify(0, 0, 0, 10, 0, 3, 10, 10)), static_cast<int>(tile_kind::full));
  const mask_expr all_of = parses_and_round_trips(joined("window(5, 0)", " & ", 100000));
  EXPECT_EQ(all_of.depth(), 2);
  EXPECT_EQ(all_of.row_bits(0, 0, 9, 0, 10, 10, 10), 0x3f0u);  // keys 4..9
  // Mixed precedence stays three levels: an | of & chains.
  EXPECT_EQ(parses_and_round_trips(joined("causal & sinks(2)", " | ", 50000)).depth(), 3);
}

TEST(MaskSpec, PrintedChainsParseBack) {
  // "full|full|...|full", 201 terms: str() used to nest 200 parentheses, one more than the parser takes.
  EXPECT_EQ(parses_and_round_trips(joined("full", "|", 201)).str(), "(" + joined("full", " | ", 201) + ")");
  // Grouping is not kept: any grouping of one operator prints as one chain.
  EXPECT_EQ(parses_and_round_trips("((sinks(1) | sinks(2)) | (sinks(3) | (sinks(4))))").str(),
            "(sinks(1) | sinks(2) | sinks(3) | sinks(4))");
  EXPECT_EQ(parses_and_round_trips("~(causal & ~(sinks(2) | dilated(3))) & window(4)").str(),
            "(~(causal(bottom_right) & ~(sinks(2) | dilated(3))) & window(4,0,bottom_right))");
}

TEST(MaskSpec, NestingIsBoundedWithTheSameLimitAsCheck) {
  ASSERT_EQ(mask_expr::max_depth, 200);
  // Parentheses and negations: the parser's own recursion.
  parses_and_round_trips(repeat("(", 199) + "causal" + repeat(")", 199));
  EXPECT_NE(error_of(repeat("(", 200) + "causal" + repeat(")", 200)).find("[spec] at 200: expression nests deeper than 200"),
            std::string::npos);
  const mask_expr negations = parses_and_round_trips(repeat("~", 199) + "sinks(1)");  // depth 200, the limit
  EXPECT_EQ(negations.depth(), 200);
  EXPECT_EQ(negations.check(), "");
  EXPECT_NE(error_of(repeat("~", 200) + "sinks(1)").find("[spec] at 200: expression nests deeper than 200"), std::string::npos);
  EXPECT_NE(error_of(repeat("~ ", 100000) + "sinks(1)").find("expression nests deeper than 200"), std::string::npos);
  // The tree: "x & (...) | y" adds two levels per parenthesis, so the tree reaches the limit before the parser does.
  // Its printed form nests as deep as the tree, so accepting it would have printed a string that does not parse.
  std::string deep = "sinks(1)";
  for (int level = 0; level < 99; ++level) deep = "causal & (" + deep + ") | dilated(2)";
  const mask_expr at_limit = parses_and_round_trips(deep);  // depth 1 + 2 * 99 = 199
  EXPECT_EQ(at_limit.depth(), 199);
  deep = "causal & (" + deep + ") | dilated(2)";  // 201
  const std::string err = error_of(deep);
  EXPECT_EQ(err.rfind("[spec] at " + std::to_string(deep.rfind('|')) + ": expression nests deeper than 200", 0), 0u)
      << err.substr(0, 200);  // at the operator that made the tree too deep
}

TEST(ScoreSpec, LongChainsAreBoundedAndLinear) {
  // The 64-term limit keeps score chains (nested scores::then) shallow; a 100,000-term string is refused after the 64th '+'.
  score_fn f;
  EXPECT_EQ(parse_score(joined("softcap(30)", " + ", 64), 1, f), "");
  const std::string text = joined("softcap(30)", " + ", 100000);
  const std::string err = parse_score(text, 1, f);
  EXPECT_EQ(err.rfind("[spec] at " + std::to_string(64 * 11 + 64 * 3 - 1) + ": more than 64 terms", 0), 0u) << err.substr(0, 100);
}

// Whether `s` is well-formed UTF-8, decoded by code point ranges (an oracle written independently of the parser's).
bool valid_utf8(const std::string& s) {
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const std::size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    std::uint32_t cp = n == 1 ? c : c & (0x7f >> n);
    for (std::size_t k = 1; k < n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    const std::uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};  // shorter forms are overlong
    if (cp < least[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += n;
  }
  return true;
}

// The whole message of an error at `column`: "[spec] at <column>: <what>", the text as shown, a caret under column.
std::string message(std::size_t column, const std::string& what, const std::string& shown) {
  return "[spec] at " + std::to_string(column) + ": " + what + "\n  " + shown + "\n  " + std::string(column, ' ') + "^";
}

std::string mask_error(const std::string& text) {
  mask_expr m;
  return parse_mask(text, m);
}

std::string score_error(const std::string& text) {
  score_fn f;
  return parse_score(text, 1, f);
}

TEST(SpecErrors, NonAsciiCharactersAreQuotedWholeAndCountedAsOne) {
  // 'é' is two bytes: the message quotes both (it used to quote the first byte alone, which is not UTF-8, and Python
  // then lost the whole message), and the caret column counts characters.
  const std::string pattern_name = "(expected a pattern name, '~' or '(')", ascii = "(names are ASCII letters, digits and '_')";
  EXPECT_EQ(mask_error("causal & é"), message(9, "unexpected 'é' " + pattern_name, "causal & é"));
  EXPECT_EQ(mask_error("wïndow(1) ∧ causal"), message(1, "unexpected 'ï' " + ascii, "wïndow(1) ∧ causal"));
  EXPECT_EQ(mask_error("window(1) ∧ causal"), message(10, "unexpected '∧' (expected '&', '|' or the end)", "window(1) ∧ causal"));
  EXPECT_EQ(score_error("ß + softcap(2)"), message(0, "unexpected 'ß' (expected a score modifier name)", "ß + softcap(2)"));
  EXPECT_EQ(score_error("softcap(0) 😀").rfind("[spec] at 8: [scores::softcap]", 0), 0u);
  EXPECT_EQ(score_error("softcap(2) 😀"), message(11, "unexpected '😀' (expected '+' or the end)", "softcap(2) 😀"));
}

TEST(SpecErrors, BytesThatAreNotUtf8AndControlCharactersAreEscaped) {
  // A stray byte is quoted as \xNN and shown as '?'; a control character is quoted as \xNN and shown as a space, so
  // the text stays on one line above its caret.
  const std::string pattern_name = "(expected a pattern name, '~' or '(')";
  EXPECT_EQ(mask_error("causal & \xff\xfe"), message(9, "unexpected '\\xff' " + pattern_name, "causal & ??"));
  EXPECT_EQ(mask_error("causal\n&\x01"), message(8, "unexpected '\\x01' " + pattern_name, "causal & "));
  // A truncated character ("é" without its second byte) at the end.
  EXPECT_EQ(mask_error("sinks(1) | \xc3").rfind("[spec] at 11: unexpected '\\xc3'", 0), 0u);
  // Every byte value, alone and after a valid prefix, in both parsers: every message is valid UTF-8.
  for (int b = 0; b < 256; ++b) {
    const std::string c(1, static_cast<char>(b));
    for (const std::string& text : {c, "causal & " + c, "window(" + c, "é" + c + "é", "softcap(" + c + ")", "x" + c}) {
      EXPECT_TRUE(valid_utf8(mask_error(text))) << "byte " << b << ": " << mask_error(text);
      EXPECT_TRUE(valid_utf8(score_error(text))) << "byte " << b << ": " << score_error(text);
    }
  }
}

}  // namespace
}  // namespace omniattn
