// libFuzzer target for the mask spec-string parser: any input either parses into an expression whose printed form
// parses again to the same printed form, or yields a positioned "[spec] at N: ..." error; it never crashes.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "omniattn/masks.h"
#include "omniattn/spec.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  omniattn::mask_expr m;
  const std::string error = omniattn::parse_mask(text, m);
  if (!error.empty()) {
    if (error.rfind("[spec] at ", 0) != 0) std::abort();
    return 0;
  }
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
