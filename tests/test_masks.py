"""Bit-packed masks: round trip, segment alignment, the documented little bit order."""
import numpy as np
import pytest
import torch

import pagedinfer.masks as masks_module
from pagedinfer.masks import pack_masks, unpack_mask, visible_spans


def test_little_bit_order_hand_example():
    # Row-major elements 0..9 of a [2, 5] mask; set elements 0, 3, 8 and 9.
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 0] = mask[0, 3] = mask[1, 3] = mask[1, 4] = True
    packed, indptr = pack_masks([mask])
    # Byte 0: bits 0 and 3 -> 0b00001001 = 9; byte 1: bits 0 and 1 (elements 8, 9) -> 3.
    assert packed.tolist() == [9, 3]
    assert indptr.tolist() == [0, 2]
    assert packed.dtype == torch.uint8 and indptr.dtype == torch.int32


def test_segments_start_on_byte_boundaries():
    # 3x3 = 9 bits -> 2 bytes; 1x1 -> 1 byte; 0x4 -> 0 bytes; 4x4 = 16 bits -> 2 bytes.
    masks = [torch.ones(3, 3, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool),
             torch.ones(0, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool)]
    packed, indptr = pack_masks(masks)
    assert indptr.tolist() == [0, 2, 3, 3, 5]
    # The 9th bit of request 0 sits alone in its byte; the padding bits stay zero.
    assert packed.tolist() == [255, 1, 1, 255, 255]


@pytest.mark.parametrize("seed", range(5))
def test_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [tuple(torch.randint(0, 20, (2,), generator=gen).tolist()) for _ in range(6)] + [(1, 1), (8, 8)]
    masks = [torch.rand(r, c, generator=gen) < 0.5 for r, c in shapes]
    packed, indptr = pack_masks(masks)
    for b, m in enumerate(masks):
        assert int(indptr[b + 1] - indptr[b]) == (m.numel() + 7) // 8
        got = unpack_mask(packed, indptr, b, *m.shape)
        assert got.dtype == torch.bool and torch.equal(got, m)


def test_non_contiguous_input_packs_row_major():
    m = torch.rand(6, 4) < 0.5
    packed_t, indptr_t = pack_masks([m.t()])
    assert torch.equal(unpack_mask(packed_t, indptr_t, 0, 4, 6), m.t())


def test_validation_names_the_argument():
    with pytest.raises(ValueError, match=r"^masks:"):
        pack_masks([])
    with pytest.raises(ValueError, match=r"^masks\[1\]:"):
        pack_masks([torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2)])
    with pytest.raises(ValueError, match=r"^masks\[0\]:"):
        pack_masks([torch.ones(4, dtype=torch.bool)])
    packed, indptr = pack_masks([torch.ones(2, 2, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"^b:"):
        unpack_mask(packed, indptr, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^packed:"):
        unpack_mask(packed, indptr, 0, 3, 3)  # 9 bits need 2 bytes, the segment has 1
    with pytest.raises(ValueError, match=r"^packed:"):
        unpack_mask(packed.to(torch.int32), indptr, 0, 2, 2)


@pytest.mark.parametrize("span_bits", [37, 1 << 23])  # rows unpacked a few at a time, or all at once
def test_visible_spans_are_each_rows_first_last_and_first_run_of_keys(monkeypatch, span_bits):
    monkeypatch.setattr(masks_module, "_SPAN_BITS", span_bits)
    gen = torch.Generator().manual_seed(3)
    masks = [torch.rand(q, n, generator=gen) < 0.3 for q, n in [(3, 5), (7, 13), (1, 1), (5, 40), (4, 9)]]
    masks[1][2] = False  # a row that sees nothing: (kv_len, 0, kv_len)
    masks[3][0] = torch.arange(40) % 7 != 6  # runs of 6 set keys: (0, 40, 6)
    packed, indptr = pack_masks(masks)
    got = visible_spans(packed, indptr[:-1].numpy().astype(np.int64), np.array([m.shape[0] for m in masks]),
                        np.array([m.shape[1] for m in masks]))

    def want(row: torch.Tensor) -> tuple[int, int, int]:
        if not row.any():
            return len(row), 0, len(row)
        keys = row.nonzero().flatten().tolist()
        run = keys[0]
        while run < len(row) and row[run]:
            run += 1
        return keys[0], keys[-1] + 1, run
    assert list(zip(*(g.tolist() for g in got))) == [want(r) for m in masks for r in m]
    assert want(masks[3][0]) == (0, 40, 6)
