"""attend(): the one-query path (AR steps) equals torch's SDPA with grouped heads repeated, masked or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from canvaslm.models.cache import attend


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_query_attention_equals_sdpa(dtype, atol):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 8, generator=g).to(dtype)
    k, v = (torch.randn(3, 2, 11, 8, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(3, 1, 1, 11, generator=g) > 0.3
    mask[..., -1] = True  # every row sees at least itself
    for m in (mask, None):
        ours = attend(q, k, v, m, scale=0.3)
        reference = F.scaled_dot_product_attention(q.float(), k.repeat_interleave(3, 1).float(),
                                                   v.repeat_interleave(3, 1).float(), attn_mask=m, scale=0.3)
        assert ours.shape == (3, 1, 48) and ours.dtype == dtype
        torch.testing.assert_close(ours.float(), reference.transpose(1, 2).reshape(3, 1, 48), atol=atol, rtol=0)
