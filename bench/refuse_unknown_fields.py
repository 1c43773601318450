"""Time and peak memory to refuse a 24 MiB update reply padded with unknown protobuf fields
(issue 27, point 3): `python bench/refuse_unknown_fields.py`; one run, a few seconds."""

import resource
import struct
import time

import torch

from fedsms import codec
from fedsms.codec import _TRAILER_LEN, _crc32

torch.manual_seed(0)
state = {
    "a.weight": torch.randn(256, 64),
    "a.bias": torch.randn(256),
    "b.weight": torch.randn(10, 256),
    "b.bias": torch.randn(10),
}
mask = {k: torch.rand(v.shape) > 0.5 for k, v in state.items() if k.endswith("weight")}
digest = codec.mask_digest(mask)
good = codec.encode(state, mask, phase=1, round=1, kind="update", num_examples=10)
body = good[:-_TRAILER_LEN]
extra = bytes([0xA0, 0x01, 0x01]) * (24 * 2**20 // 3)  # field 20, varint 1: ~8.4M unknown fields, 24 MiB
body = body + extra
bad = body + bytes([(15 << 3) | 5]) + struct.pack("<I", _crc32(body))
reader = codec.UpdateReader(mask, state, digest=digest, phase=1, round=1)
reader.read(good)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    reader.read(bad)
    print("accepted?!")
except codec.PayloadError as e:
    print("refused:", str(e)[:150])
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"reply {len(bad) / 2**20:.1f} MiB: refused in {dt:.3f} s, peak RSS +{(peak - base) / 1024:.1f} MiB")
