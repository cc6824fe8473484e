// The benchmark's JSON value: recursive-descent parser and a pretty printer.
#include "bench/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace omniattn::bench {

json json::array() {
  json j;
  j.kind_ = kind::array;
  return j;
}

json json::object() {
  json j;
  j.kind_ = kind::object;
  return j;
}

json& json::push(json v) {
  items_.push_back(std::move(v));
  return items_.back();
}

json& json::set(const std::string& key, json v) {
  for (auto& [k, val] : members_)
    if (k == key) return val = std::move(v);
  members_.emplace_back(key, std::move(v));
  return members_.back().second;
}

const json* json::find(std::string_view key) const {
  for (const auto& [k, val] : members_)
    if (k == key) return &val;
  return nullptr;
}

json* json::find(std::string_view key) {
  for (auto& [k, val] : members_)
    if (k == key) return &val;
  return nullptr;
}

std::string json_quote(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string json_number(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[40];
  if (x == std::trunc(x) && std::fabs(x) < 9.007199254740992e15)
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(x));
  else
    std::snprintf(buf, sizeof buf, "%.6g", x);
  return buf;
}

namespace {

bool is_scalar(const json& j) { return !j.is_array() && !j.is_object(); }

}  // namespace

std::string json::dump(int indent) const {
  switch (kind_) {
    case kind::null: return "null";
    case kind::boolean: return bool_ ? "true" : "false";
    case kind::number: return json_number(num_);
    case kind::string: return json_quote(str_);
    case kind::array:
    case kind::object: break;
  }
  const bool obj = kind_ == kind::object;
  const std::size_t n = obj ? members_.size() : items_.size();
  if (n == 0) return obj ? "{}" : "[]";
  bool flat = true;
  for (std::size_t i = 0; i < n; ++i) flat = flat && is_scalar(obj ? members_[i].second : items_[i]);
  const std::string pad(static_cast<std::size_t>(indent + 2), ' '), end_pad(static_cast<std::size_t>(indent), ' ');
  std::string out = obj ? "{" : "[";
  for (std::size_t i = 0; i < n; ++i) {
    out += i ? (flat ? ", " : ",\n" + pad) : (flat ? "" : "\n" + pad);
    if (obj) out += json_quote(members_[i].first) + ": ";
    out += (obj ? members_[i].second : items_[i]).dump(indent + 2);
  }
  out += flat ? "" : "\n" + end_pad;
  return out + (obj ? "}" : "]");
}

namespace {

class parser {
 public:
  explicit parser(std::string_view text) : s_(text) {}

  bool document(json& out, std::string& error) {
    bool ok = value(out, 0);
    if (ok) {
      skip_ws();
      if (pos_ != s_.size()) ok = fail("unexpected text after the document");
    }
    if (!ok) error = where() + ": " + error_;
    return ok;
  }

 private:
  std::string_view s_;
  std::size_t pos_ = 0;
  std::string error_;

  bool fail(const std::string& what) {
    if (error_.empty()) error_ = what;
    return false;
  }

  std::string where() const {
    std::size_t line = 1, col = 1;
    for (std::size_t i = 0; i < pos_ && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    return "line " + std::to_string(line) + ", column " + std::to_string(col);
  }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  bool literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return fail("invalid literal");
    pos_ += word.size();
    return true;
  }

  bool value(json& out, int depth) {
    if (depth > 64) return fail("nesting deeper than 64");
    skip_ws();
    if (pos_ >= s_.size()) return fail("unexpected end of input, expected a value");
    const char c = s_[pos_];
    if (c == '{') return object(out, depth);
    if (c == '[') return array(out, depth);
    if (c == '"') {
      std::string str;
      if (!string(str)) return false;
      out = json(std::move(str));
      return true;
    }
    if (c == 't') return literal("true") && (out = json(true), true);
    if (c == 'f') return literal("false") && (out = json(false), true);
    if (c == 'n') return literal("null") && (out = json(), true);
    if (c == '-' || (c >= '0' && c <= '9')) return number(out);
    return fail(std::string("unexpected character '") + c + "'");
  }

  bool number(json& out) {
    const std::size_t start = pos_;
    if (s_[pos_] == '-') ++pos_;
    auto digits = [&] {
      const std::size_t d0 = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ > d0;
    };
    if (!digits()) return fail("malformed number");
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (!digits()) return fail("malformed number");
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (!digits()) return fail("malformed number");
    }
    out = json(std::strtod(std::string(s_.substr(start, pos_ - start)).c_str(), nullptr));
    return true;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  bool hex4(unsigned& cp) {
    if (pos_ + 4 > s_.size()) return fail("truncated \\u escape");
    cp = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = s_[pos_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f') cp |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') cp |= static_cast<unsigned>(h - 'A' + 10);
      else return fail("bad hex digit in \\u escape");
    }
    return true;
  }

  bool string(std::string& out) {
    ++pos_;  // opening quote
    while (true) {
      if (pos_ >= s_.size()) return fail("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) return fail("unterminated string");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = 0;
          if (!hex4(cp)) return false;
          if (cp >= 0xD800 && cp < 0xDC00 && s_.substr(pos_, 2) == "\\u") {
            pos_ += 2;
            unsigned lo = 0;
            if (!hex4(lo)) return false;
            if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: --pos_; return fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }

  bool array(json& out, int depth) {
    ++pos_;
    out = json::array();
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      return true;
    }
    while (true) {
      json v;
      if (!value(v, depth + 1)) return false;
      out.push(std::move(v));
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < s_.size() && s_[pos_] == ']') {
        ++pos_;
        return true;
      }
      return fail("expected ',' or ']' in array");
    }
  }

  bool object(json& out, int depth) {
    ++pos_;
    out = json::object();
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      return true;
    }
    while (true) {
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') return fail("expected a string key in object");
      std::string key;
      if (!string(key)) return false;
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != ':') return fail("expected ':' after key \"" + key + "\"");
      ++pos_;
      json v;
      if (!value(v, depth + 1)) return false;
      if (out.find(key)) return fail("duplicate key \"" + key + "\"");
      out.set(key, std::move(v));
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < s_.size() && s_[pos_] == '}') {
        ++pos_;
        return true;
      }
      return fail("expected ',' or '}' in object");
    }
  }
};

}  // namespace

bool json::parse(std::string_view text, json& out, std::string& error) {
  parser p(text);
  json v;
  if (!p.document(v, error)) return false;
  out = std::move(v);
  return true;
}

}  // namespace omniattn::bench
