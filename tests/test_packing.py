"""packing.pack/unpack: exact round trip at every width, exact size, range checks."""
import math

import pytest
import torch

from ttvq_methods.packing import pack, packed_nbytes, unpack


@pytest.mark.parametrize("bits", list(range(1, 17)) + [24])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000, 1003])
def test_round_trip_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    v = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64)
    v[0] = 2**bits - 1  # the extreme values must survive too
    if n > 1:
        v[-1] = 0
    p = pack(v, bits)
    assert p.dtype == torch.uint8
    assert p.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(unpack(p, bits, n), v)


def test_bit_layout_is_little_endian():
    # 3-bit values 5 (101), 3 (011), 6 (110): stream bits LSB first = 1,0,1, 1,1,0, 0,1,1
    # -> byte 0 = bits 0..7 = 1,0,1,1,1,0,0,1 = 0b10011101 = 157, byte 1 = bit 8 = 1
    p = pack(torch.tensor([5, 3, 6]), 3)
    assert p.tolist() == [157, 1]


def test_shape_is_flattened():
    v = torch.arange(12).view(3, 4) % 4
    assert torch.equal(unpack(pack(v, 2), 2, 12).view(3, 4), v)


@pytest.mark.parametrize("bad", [-1, 16])
def test_out_of_range_raises(bad):
    with pytest.raises(ValueError):
        pack(torch.tensor([0, bad, 3]), 4)


def test_bad_width_and_short_buffer_raise():
    with pytest.raises(ValueError):
        pack(torch.tensor([0]), 0)
    with pytest.raises(ValueError):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, 5)  # 5 nibbles need 3 bytes
