#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_attention (tests/fuzz/corpus_attention/): one hand-described call per file.

The byte format is the one fuzz_attention.cc reads, front to back (missing bytes read as 0):
  flags      dtype % 3 (f32, bf16, f16) | 4 f32 output | 8 lse | 16 sink logits | 32 stats | 64 varlen
  shape      batch % 4 | causal << 2 (3 = an invalid value)
  seq_q % 81, seq_k % 81
  heads      kv heads = x % 5, query heads = kv * (1 + (x >> 3) % 4), + 1 when bit 7 is set (not a multiple)
  dim_qk % 141, dim_v (odd: = dim_qk, else (x / 2) % 141)
  layouts    2 bits per q, k, v, out: BSHD, BHSD, padded (3 more bytes), arbitrary strides (4 more bytes)
  broadcast  1 K/V batch stride 0 | 2 K/V head stride 0 | 4 q batch stride 0 | 8 out seq stride 0 | 16 negative k seq
             stride | 32 K and V interleaved in one buffer
  threads % 4 (| 4: EMU128 instead of AVX2), scale mode (% 3 == 0: default), scale byte, backend (% 4 == 3: invalid), input magnitude, 8 seed bytes
  [varlen: lq, lk per sequence, then a malformation byte] [layout bytes] lse mode [one sink byte per query head]
  mask spec text '\\n' score spec text
Rewrites the files in place; run it after changing the format, then replay: fuzz_attention -runs=0 corpus_attention.
"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus_attention')


def heads_byte(kv, group):
    return next(h for h in range(128) if h % 5 == kv and 1 + (h >> 3) % 4 == group)


def case(name, dtype=0, out_f32=False, lse=True, sinks=b'', stats=False, varlen=b'', batch=1, causal=0, lq=16, lk=16,
         kv=1, group=1, dqk=32, dv=None, layouts=0, broadcast=0, threads=1, scale_mode=0, scale_byte=0, backend=2,
         magnitude=6, seed=1, layout_bytes=b'', lse_mode=0, mask='', score=None):
    flags = dtype | 4 * out_f32 | 8 * lse | 16 * bool(sinks) | 32 * stats | 64 * bool(varlen)
    data = bytes([flags, batch | causal << 2, lq, lk, heads_byte(kv, group), dqk, 1 if dv is None else 2 * dv, layouts,
                  broadcast, threads, scale_mode, scale_byte, backend, magnitude]) + struct.pack('<Q', seed)
    data += varlen + layout_bytes + bytes([lse_mode]) + sinks + mask.encode()
    if score is not None:
        data += b'\n' + score.encode()
    with open(os.path.join(OUT, name), 'wb') as f:
        f.write(data)


os.makedirs(OUT, exist_ok=True)
case('dense_f32', lq=16, lk=20, kv=2, group=2)
case('causal_bf16_gqa', dtype=1, causal=2, batch=2, lq=40, lk=33, kv=2, group=4, dqk=64, threads=2)
case('f16_bhsd_dv', dtype=2, out_f32=True, layouts=0b01010101, lq=65, lk=7, kv=1, group=3, dqk=17, dv=40)
case('window_sinks', mask='window(8, 0) | sinks(2)', sinks=bytes([53] * 4), kv=2, group=2, lq=50, lk=50)
case('neighborhood_grid', mask='neighborhood(8x8, 3x3)', lq=64, lk=64, kv=1, group=2, dqk=24, threads=2)
case('score_alibi_softcap', mask='causal', score='alibi + softcap(5)', kv=4, group=1, lq=30, lk=45, threads=3)
case('varlen', varlen=bytes([5, 30, 0, 4, 20, 0, 0]), batch=3, lq=20, lk=30, kv=1, group=2, causal=1)
case('broadcast_kv', batch=3, broadcast=1 | 2, kv=2, group=2, lq=9, lk=70, backend=0, threads=0)
case('padded_strides', threads=4 | 2, layouts=0b10101010, layout_bytes=bytes([1, 2, 3] * 4), lq=31, lk=64, dqk=140, lse_mode=2)
case('packed_kv_small_scale', broadcast=32, scale_mode=2 + 3 * 7, scale_byte=30, lq=12, lk=12, dqk=8)
case('invalid_scale_nan', scale_mode=1, lq=4, lk=4)
case('invalid_causal_backend', causal=3, backend=3, lq=4, lk=4)
case('fully_masked_rows', mask='window(2, 0, tl) & ~sinks(5)', lq=10, lk=10)
case('reference_backend', backend=1, dtype=1, mask='document(0, 3, 16)', lq=16, lk=16, kv=1, group=4)
