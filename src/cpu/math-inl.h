// Vector math the CPU kernels share, per ISA (Highway -inl.h: included once per target): the softmax's exponential
// and the softcap's tanh.
#if defined(OMNIATTN_CPU_MATH_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef OMNIATTN_CPU_MATH_INL_H_
#undef OMNIATTN_CPU_MATH_INL_H_
#else
#define OMNIATTN_CPU_MATH_INL_H_
#endif

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace omniattn::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// 2^x for x <= 0 (the softmax argument), exact to about 1 ulp: x = n + f with f in [-0.5, 0.5], 2^f by a degree-7
// Taylor polynomial of e^(f ln 2) (truncation error < 1e-9), 2^n by building the exponent field. x < -126 gives 0,
// which also maps masked (-inf) scores to exactly zero probability.
// Rounding uses the shifter trick: adding 1.5 * 2^23 + 127 leaves round(x) + 127 in the low mantissa bits, so one add
// yields both n (subtract the shifter back) and the biased exponent (shift those bits up), without float-int
// conversions (Highway 1.0.3's ConvertTo adds overflow fix-ups that cost more than the polynomial's FMAs).
template <class D>
HWY_INLINE hn::Vec<D> exp2_neg(D d, hn::Vec<D> x) {
  const hn::RebindToUnsigned<D> du;
  const auto shifter = hn::Set(d, 12582912.0f + 127.0f);
  // Clamped by compare and select, not Max: Max may return the bound for a NaN lane, and a NaN must stay NaN (it
  // makes its softmax row NaN, as in the oracle).
  x = hn::IfThenElse(hn::Lt(x, hn::Set(d, -127.0f)), hn::Set(d, -127.0f), x);
  const auto t = hn::Add(x, shifter);
  const auto f = hn::Sub(x, hn::Sub(t, shifter));
  auto p = hn::Set(d, 1.5252733804059841e-05f);  // ln2^7 / 7!
  p = hn::MulAdd(p, f, hn::Set(d, 1.5403530393381610e-04f));
  p = hn::MulAdd(p, f, hn::Set(d, 1.3333558146428443e-03f));
  p = hn::MulAdd(p, f, hn::Set(d, 9.6181291076284772e-03f));
  p = hn::MulAdd(p, f, hn::Set(d, 5.5504108664821580e-02f));
  p = hn::MulAdd(p, f, hn::Set(d, 2.4022650695910071e-01f));
  p = hn::MulAdd(p, f, hn::Set(d, 6.9314718055994531e-01f));
  p = hn::MulAdd(p, f, hn::Set(d, 1.0f));
  return hn::Mul(p, hn::BitCast(d, hn::ShiftLeft<23>(hn::BitCast(du, t))));
}

// tanh(x) for the logit softcap, within about 2 ulp. |x| >= 0.55: (1 - e) / (1 + e) with e = e^(-2 |x|) by exp2_neg;
// there e <= 0.33, so e's own rounding reaches tanh amplified by at most 2e / (1 - e^2) < 0.75 (closer to 0 the
// amplification grows without bound, hence the other branch). |x| < 0.55: the odd Taylor series to x^19 (the next
// term is below 4e-10 there). |x| is clamped to 9, where tanh already rounds to 1, so +-inf scores (masked keys in a
// bias table) give +-1 instead of inf - inf.
template <class D>
HWY_INLINE hn::Vec<D> tanh_fast(D d, hn::Vec<D> x) {
  const auto ax = hn::IfThenElse(hn::Gt(hn::Abs(x), hn::Set(d, 9.0f)), hn::Set(d, 9.0f), hn::Abs(x));  // NaN stays NaN
  const auto one = hn::Set(d, 1.0f);
  const auto x2 = hn::Mul(ax, ax);
  auto p = hn::Set(d, -2.3912911424355248e-04f);                 // -443861162 / 1856156927625
  p = hn::MulAdd(p, x2, hn::Set(d, 5.9002744094558599e-04f));   // 6404582 / 10854718875
  p = hn::MulAdd(p, x2, hn::Set(d, -1.4558343870513183e-03f));  // -929569 / 638512875
  p = hn::MulAdd(p, x2, hn::Set(d, 3.5921280365724810e-03f));   // 21844 / 6081075
  p = hn::MulAdd(p, x2, hn::Set(d, -8.8632355299021966e-03f));  // -1382 / 155925
  p = hn::MulAdd(p, x2, hn::Set(d, 2.1869488536155203e-02f));   // 62 / 2835
  p = hn::MulAdd(p, x2, hn::Set(d, -5.3968253968253968e-02f));  // -17 / 315
  p = hn::MulAdd(p, x2, hn::Set(d, 1.3333333333333333e-01f));   // 2 / 15
  p = hn::MulAdd(p, x2, hn::Set(d, -3.3333333333333333e-01f));  // -1 / 3
  const auto near = hn::MulAdd(hn::Mul(p, x2), ax, ax);
  const auto is_near = hn::Lt(ax, hn::Set(d, 0.55f));
  // Softcapped logits are mostly far below the cap: skip the exponential and the division when no lane needs them.
  if (hn::AllTrue(d, is_near)) return hn::CopySign(near, x);
  const auto e = exp2_neg(d, hn::Mul(ax, hn::Set(d, -2.8853900817779268f)));  // -2 log2(e)
  const auto far = hn::Div(hn::Sub(one, e), hn::Add(one, e));
  return hn::CopySign(hn::IfThenElse(hn::Ge(ax, hn::Set(d, 0.55f)), far, near), x);  // NaN: near, which is NaN
}

}  // namespace omniattn::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard toggle
