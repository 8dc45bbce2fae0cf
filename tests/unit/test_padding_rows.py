"""Padding rows masked out of the MoE routing from a device count, as a replayed CUDA graph
needs: its Python row counts are those of the capture, only `real_rows` is this step's."""

import pytest
import torch

from engine.model_api import ForwardBatch, ForwardMode
from models.layers.router import mask_padding
from tests.support.batches import make_batch


def _routing(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    return torch.rand(rows, 2, generator=g), torch.randint(0, 8, (rows, 2), generator=g)


@pytest.mark.parametrize("num_valid", [0, 3, 5, 7])
def test_device_count_masks_as_the_host_count(num_valid):
    weights, ids = _routing(7)
    by_host = mask_padding(weights.clone(), ids.clone(), num_valid)
    by_device = mask_padding(weights.clone(), ids.clone(), torch.tensor(num_valid))
    for host, device in zip(by_host, by_device, strict=True):
        torch.testing.assert_close(device, host, rtol=0, atol=0)
    assert (by_device[1][num_valid:] == -1).all() and (by_device[0][num_valid:] == 0).all()
    assert (by_device[1][:num_valid] == ids[:num_valid]).all()


def _batch(non_padded: int, num_tokens: int, on_device: bool) -> ForwardBatch:
    real = torch.tensor([non_padded, num_tokens]) if on_device else None
    return make_batch(
        ForwardMode.DECODE, num_tokens, rows=8, num_token_non_padded=non_padded, real_rows=real
    )


@pytest.mark.parametrize("non_padded", [0, 2, 5, 8])
@pytest.mark.parametrize("start,size", [(0, 3), (3, 3), (6, 2)])
def test_token_shard_real_rows(non_padded, start, size):
    host, device = _batch(non_padded, 8, False), _batch(non_padded, 8, True)
    expected = min(max(non_padded - start, 0), size)
    assert host.real_in(start, size) == expected
    assert int(device.real_in(start, size)) == expected


def test_replayed_counts_win_over_the_captured_ints():
    captured_ints = _batch(8, 8, False)
    replay = _batch(8, 8, True)
    replay.real_rows.copy_(torch.tensor([3, 5]))  # what CapturedStep.replay writes
    assert captured_ints.valid_rows() == 8
    assert int(replay.valid_rows()) == 3 and int(replay.valid_rows(shard_local=False)) == 5
