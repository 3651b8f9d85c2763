"""scripts/bench_decode.py's prototype: attention with the prompt's keys/values read once per group
equals ordinary attention over each row's own copy of them."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_decode  # noqa: E402


def test_group_prefix_attention_equals_attention_over_copied_prompts():
    torch.manual_seed(0)
    b, g, heads, kv_heads, p, t, d = 2, 3, 4, 2, 5, 4, 8
    n = b * g
    query = torch.randn(n, heads, 1, d)
    prompt_k, prompt_v = torch.randn(b, kv_heads, p, d), torch.randn(b, kv_heads, p, d)
    own_k, own_v = torch.randn(n, kv_heads, t, d), torch.randn(n, kv_heads, t, d)
    mask = torch.ones(n, 1, 1, p + t, dtype=torch.bool)
    mask[0, ..., :2] = False                      # left padding of row 0's prompt
    layer = bench_decode.GroupPrefixLayer(prompt_k, prompt_v, n, t)
    cache = SimpleNamespace(layers=[layer])
    got, _ = bench_decode.group_prefix_attention(SimpleNamespace(layer_idx=0), query, own_k, own_v, mask,
                                                 scaling=d ** -0.5, group_prefix=cache)
    index = torch.arange(b).repeat_interleave(g)
    keys = torch.cat([prompt_k[index], own_k], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    values = torch.cat([prompt_v[index], own_v], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask).transpose(1, 2)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-6)
