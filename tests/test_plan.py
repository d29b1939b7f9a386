"""Split-KV work lists: every token covered exactly once, tile-aligned, balanced, within the graph bound."""
import numpy as np
import pytest
import torch

from pagedinfer import plan


def covered(work, batch):
    ranges = {b: [] for b in range(batch)}
    for req, _, begin, end, *_ in work.items:
        ranges[req].append((begin, end))
    return {b: sorted(r) for b, r in ranges.items()}


@pytest.mark.parametrize("seed", range(20))
def test_items_tile_each_request_exactly(seed):
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 40))
    kv_heads = int(rng.choice([1, 3, 8]))
    ends = rng.integers(1, 20000, batch)
    begins = np.where(rng.random(batch) < 0.3, np.maximum(0, ends - rng.integers(1, 3000, batch)), 0)
    starts = rng.integers(0, 1000, batch)
    tile = int(rng.choice([16, 32, 64]))
    work = plan.split_kv(starts, begins, ends, kv_heads=kv_heads, tile=tile, target_ctas=264)
    assert work.num_items <= plan.max_items(batch, kv_heads, 264)
    for b, ranges in covered(work, batch).items():
        assert ranges[0][0] == begins[b] and ranges[-1][1] == ends[b]
        assert all(e1 == b2 for (_, e1), (b2, _) in zip(ranges, ranges[1:]))
        assert all((e - s) % tile == 0 for s, e in ranges[:-1])
    for req, row_start, _, _, slot, first, chunks, *_ in work.items:
        assert row_start == starts[req]
        assert (slot == -1) == (chunks == 1)
    slots = sorted(work.items[work.items[:, 4] >= 0, 4])
    assert slots == list(range(work.num_slots))


def test_positions_within_count_from_zero_in_each_segment():
    assert plan.positions_within(np.array([3, 0, 1, 2])).tolist() == [0, 1, 2, 0, 0, 1]


def test_large_batch_is_not_split():
    ends = np.full(64, 8192)
    work = plan.split_kv(np.zeros(64, int), np.zeros(64, int), ends, kv_heads=8, tile=32, target_ctas=264)
    assert work.num_items == 64 and work.num_slots == 0


def test_single_request_fills_the_gpu_with_equal_chunks():
    work = plan.split_kv(np.zeros(1, int), np.zeros(1, int), np.array([32768]), kv_heads=8, tile=32,
                         target_ctas=264)
    sizes = work.items[:, 3] - work.items[:, 2]
    assert work.num_items * 8 == 256 and len(set(sizes)) == 1


@pytest.mark.parametrize("batch,kv_len", [(4, 8192), (16, 4096), (3, 1000), (7, 12345)])
def test_split_fits_one_wave(batch, kv_len):
    ends = np.full(batch, kv_len)
    work = plan.split_kv(np.zeros(batch, int), np.zeros(batch, int), ends, kv_heads=8, tile=32, target_ctas=264)
    assert work.num_items * 8 <= 264
    assert work.num_items * 8 > 264 // 2 or kv_len <= 32 * 264 // 8 // batch


@pytest.mark.parametrize("seed", range(5))
def test_longest_first_by_request_groups_each_size_class_by_request(seed):
    rng = np.random.default_rng(seed)
    n, tile = int(rng.integers(1, 300)), 128
    items = np.zeros((n, plan.ITEM_INTS), dtype=np.int32)
    items[:, 0] = rng.integers(0, 12, n)
    items[:, 3] = rng.integers(1, 40 * tile, n)
    items[:, 7] = np.arange(n)  # to follow each item
    ordered = plan.longest_first_by_request(items, tile)
    assert sorted(ordered[:, 7]) == list(range(n))
    tiles = -(-ordered[:, 3] // tile)
    size_class = np.floor(np.log2(tiles))
    assert (np.diff(size_class) <= 0).all()  # longer classes first
    for c in np.unique(size_class):
        members = ordered[size_class == c]
        assert (np.diff(members[:, 0]) >= 0).all()  # each request's items together
        for req in np.unique(members[:, 0]):
            assert (np.diff(members[members[:, 0] == req, 3]) <= 0).all()  # longest first


def test_carve_buffers_from_a_caller_workspace():
    raw = torch.zeros(4096 + 256, dtype=torch.uint8)
    ws = raw[(-raw.data_ptr()) % 256:][:4096]  # 256-byte aligned, as device allocations are
    bufs = plan.carve_buffers([("a", 10, torch.int32), ("b", 3, torch.float32)], "cpu", ws)
    assert bufs["a"].numel() == 10 and bufs["b"].numel() == 3
    assert bufs["a"].data_ptr() == ws.data_ptr() and bufs["b"].data_ptr() == ws.data_ptr() + 256
    with pytest.raises(ValueError, match="workspace: expected at least 512 bytes for this plan, got 300"):
        plan.carve_buffers([("a", 10, torch.int32), ("b", 3, torch.float32)], "cpu", ws[:300])
    with pytest.raises(ValueError, match="workspace: expected a contiguous 1-D uint8 tensor"):
        plan.carve_buffers([("a", 10, torch.int32)], "cpu", torch.zeros(100, dtype=torch.int32))


@pytest.mark.parametrize("seed", range(30))
def test_chunk_is_the_shortest_that_fits_the_wave(seed):
    """The chunk length split_kv picks (before equalising a request's chunks) is the smallest whole number
    of tiles, at least min_chunk, whose chunk count fits the wave: checked by trying every length."""
    rng = np.random.default_rng(seed)
    batch, kv_heads, tile, target = int(rng.integers(1, 30)), int(rng.choice([1, 3, 8])), 64, 264
    lens = rng.integers(1, int(rng.choice([300, 5000, 60000])), batch)
    budget = target // kv_heads
    work = plan.split_kv(np.zeros(batch, int), np.zeros(batch, int), lens, kv_heads=kv_heads, tile=tile,
                         target_ctas=target, min_chunk=128)
    if batch >= budget:
        assert work.num_items == batch
        return
    fits = [c for c in range(2, -(-int(lens.max()) // tile) + 2) if (-(-lens // (c * tile))).sum() <= budget]
    shortest = min(fits)
    chunks = np.maximum(1, -(-lens // (shortest * tile)))
    assert work.num_items == int(np.maximum(1, -(-lens // (-(-(-(-lens // chunks)) // tile) * tile))).sum())


def _plan_contents(wrapper, batch, lens, page_size, width):
    """(item count, items, the used page ids of each request) from a wrapper's device buffers."""
    work = wrapper._buffers["work"].cpu()
    n, ids_at = int(work[0]), wrapper._ids_at()
    used = [work[ids_at + i * width: ids_at + i * width + -(-int(lens[i]) // page_size)].tolist()
            for i in range(batch)]
    return n, work[plan.ITEM_INTS:plan.ITEM_INTS * (1 + n)].view(n, plan.ITEM_INTS), used


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(60))
def test_device_plan_equals_host_plan(seed):
    """CUDA-graph plans of uniform batches run on the GPU (kernels/plan.cu): the same items (their requests'
    numbers included) and page ids as the host plan of the same lengths (strided lengths keep a wrapper on
    the host path)."""
    from pagedinfer.decode import DecodeWrapper
    from pagedinfer.paged import block_page_table
    from pagedinfer.verify import VerifyWrapper
    rng = np.random.default_rng(seed)
    qo_len = 1 if seed % 2 else int(rng.integers(1, 17))
    batch = int(rng.choice([1, 2, 3, 7, 30, 64, 200]))
    kv_heads, group = int(rng.choice([1, 2, 3, 8])), int(rng.choice([1, 3, 4, 8]))
    page_size = int(rng.choice([1, 16, 64]))
    lens = rng.integers(qo_len, int(rng.choice([300, 5000, 40000])), batch)
    width = -(-int(lens.max()) // page_size) + int(rng.integers(0, 3))
    ids = torch.randint(0, 1 << 20, (batch, width), dtype=torch.int32, device="cuda")
    window = int(rng.integers(0, 3000)) if rng.random() < 0.3 else -1
    max_batch = batch + int(rng.integers(0, 5))
    contents = []
    for stride in (1, 2):
        seq_lens = torch.tensor(np.repeat(lens, stride), dtype=torch.int32, device="cuda")[::stride]
        table = block_page_table(ids, seq_lens, page_size)
        args = dict(max_batch_size=max_batch, max_pages=max_batch * width)
        if qo_len == 1:
            wrapper = DecodeWrapper("cuda", use_cuda_graph=True, **args)
            plan_once = lambda: wrapper.plan(table, group * kv_heads, kv_heads, 128, window_left=window)  # noqa: E731
        else:
            wrapper = VerifyWrapper("cuda", use_cuda_graph=True, max_qo_len=16, **args)
            qo_indptr = torch.arange(batch + 1, dtype=torch.int32) * qo_len
            plan_once = lambda: wrapper.plan(qo_indptr, table, group * kv_heads, kv_heads, 128,  # noqa: E731
                                             window_left=window)
        plan_once()
        wrapper._buffers["work"].fill_(-7)  # a second plan into poisoned buffers writes all it needs
        plan_once()
        contents.append(_plan_contents(wrapper, batch, lens, page_size, width))
    (n, items, used), (n_host, items_host, used_host) = contents
    assert n == n_host and torch.equal(items, items_host)
    assert used == used_host == [ids[i, :len(u)].tolist() for i, u in enumerate(used)]
