// A small JSON value for the benchmark: the workload file reader, the peak cache and results.json.
// Objects keep their members in insertion order (so results.json reads in the order it was written). Numbers are
// doubles; NaN and infinities are written as null. Parse errors name the line and column.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace omniattn::bench {

class json {
 public:
  enum class kind : std::uint8_t { null, boolean, number, string, array, object };

  json() = default;  // null
  json(std::nullptr_t) {}
  json(bool b) : kind_(kind::boolean), bool_(b) {}
  json(double x) : kind_(kind::number), num_(x) {}
  json(int x) : json(static_cast<double>(x)) {}
  json(std::int64_t x) : json(static_cast<double>(x)) {}
  json(const char* s) : kind_(kind::string), str_(s) {}
  json(std::string s) : kind_(kind::string), str_(std::move(s)) {}
  json(std::string_view s) : kind_(kind::string), str_(s) {}

  static json array();
  static json object();

  kind type() const { return kind_; }
  bool is_null() const { return kind_ == kind::null; }
  bool is_bool() const { return kind_ == kind::boolean; }
  bool is_number() const { return kind_ == kind::number; }
  bool is_string() const { return kind_ == kind::string; }
  bool is_array() const { return kind_ == kind::array; }
  bool is_object() const { return kind_ == kind::object; }

  bool as_bool() const { return bool_; }
  double as_number() const { return num_; }
  const std::string& as_string() const { return str_; }

  // Arrays.
  const std::vector<json>& items() const { return items_; }
  json& push(json v);
  // Objects: set() replaces an existing key; find() returns null when the key is absent.
  const std::vector<std::pair<std::string, json>>& members() const { return members_; }
  json& set(const std::string& key, json v);
  const json* find(std::string_view key) const;
  json* find(std::string_view key);

  // Pretty text: an array or object whose elements are all scalars is written on one line.
  std::string dump(int indent = 0) const;

  // Parses a whole document; on error returns false and sets `error` to "line L, column C: what".
  static bool parse(std::string_view text, json& out, std::string& error);

 private:
  kind kind_ = kind::null;
  bool bool_ = false;
  double num_ = 0.0;
  std::string str_;
  std::vector<json> items_;
  std::vector<std::pair<std::string, json>> members_;
};

// JSON string literal of s, quotes included.
std::string json_quote(std::string_view s);
// A number as results.json writes it: integers exactly, others with 6 significant digits, non-finite as null.
std::string json_number(double x);

}  // namespace omniattn::bench
