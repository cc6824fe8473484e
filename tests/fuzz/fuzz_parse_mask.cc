// libFuzzer target for the spec-string parsers. Masks: any input either parses into a valid expression (check() is
// empty: no tree deeper than mask_expr::max_depth) whose printed form parses again to the same printed form, or yields
// a positioned "[spec] at N: ..." error. Scores (the same input):
// either a "[spec] at N: ..." error whose caret line points inside the text, or a modifier whose single terms never
// turn a finite logit into NaN. Neither parser may crash.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "omniattn/masks.h"
#include "omniattn/scores.h"
#include "omniattn/spec.h"

namespace {

void fuzz_score(std::string_view text) {
  omniattn::score_fn f;
  const std::string error = omniattn::parse_score(text, 6, f);
  if (!error.empty()) {
    if (error.rfind("[spec] at ", 0) != 0) std::abort();
    const std::size_t pos = std::strtoull(error.c_str() + 10, nullptr, 10);
    if (pos > text.size() || error.back() != '^') std::abort();
    return;
  }
  if (!f) return;  // "none"
  // One modifier with finite parameters maps a finite logit to a number (an infinity at worst, e.g. a huge slope);
  // chains may legitimately meet inf - inf, so they are only evaluated.
  const bool single = text.find('+') == std::string_view::npos;
  for (std::int64_t h = 0; h < 6; ++h)
    for (double x : {-30.0, -0.5, 0.0, 1.25, 40.0})
      if (std::isnan(f(x, 0, h, 5, 2)) && single) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  fuzz_score(text);
  omniattn::mask_expr m;
  const std::string error = omniattn::parse_mask(text, m);
  if (!error.empty()) {
    if (error.rfind("[spec] at ", 0) != 0) std::abort();
    return 0;
  }
  if (!m.check().empty()) std::abort();
  const std::string printed = m.str();
  omniattn::mask_expr again;
  if (!omniattn::parse_mask(printed, again).empty() || again.str() != printed) std::abort();
  // Evaluate a few elements and a tile so the evaluation paths see fuzzed shapes too.
  for (std::int64_t i = 0; i < 4; ++i)
    for (std::int64_t j = 0; j < 4; ++j) (void)m.allows(0, 0, i, j, 4, 4);
  (void)m.row_bits(0, 0, 3, 0, 64, 70, 70);
  (void)m.classify(0, 0, 0, 5, 0, 5, 5, 5);
  return 0;
}
