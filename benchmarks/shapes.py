"""Gradient shapes of realistic models, without the models: GPT-2 small and ResNet-18.

Each model is a flat ``{name: (shape, dense)}`` dict in Flax layout (kernels
``(..., in, out)``); ``dense`` marks the leaves GreedyLore's spec keeps uncompressed
(section 1.4: embeddings, output heads and classifiers). Vectors (biases, norms) are
always sent dense by the low-rank methods.
"""

from __future__ import annotations

Leaf = tuple[tuple[int, ...], bool]


def gpt2_small(layers: int = 12, d: int = 768, mlp: int = 3072, vocab: int = 50257,
               context: int = 1024) -> dict[str, Leaf]:
    """GPT-2 small (124M parameters at 12 layers): fused QKV, tied output head."""
    leaves: dict[str, Leaf] = {
        "wte": ((vocab, d), True),          # token embedding, tied with the LM head
        "wpe": ((context, d), True),        # position embedding
    }
    for i in range(layers):
        p = f"h{i}."
        leaves.update({
            p + "ln_1.scale": ((d,), False), p + "ln_1.bias": ((d,), False),
            p + "attn.c_attn.kernel": ((d, 3 * d), False),
            p + "attn.c_attn.bias": ((3 * d,), False),
            p + "attn.c_proj.kernel": ((d, d), False), p + "attn.c_proj.bias": ((d,), False),
            p + "ln_2.scale": ((d,), False), p + "ln_2.bias": ((d,), False),
            p + "mlp.c_fc.kernel": ((d, mlp), False), p + "mlp.c_fc.bias": ((mlp,), False),
            p + "mlp.c_proj.kernel": ((mlp, d), False), p + "mlp.c_proj.bias": ((d,), False),
        })
    leaves.update({"ln_f.scale": ((d,), False), "ln_f.bias": ((d,), False)})
    return leaves


def resnet18(classes: int = 1000) -> dict[str, Leaf]:
    """ResNet-18 for ImageNet (11.7M parameters): HWIO conv kernels, BatchNorm, a dense fc."""
    leaves: dict[str, Leaf] = {
        "conv1": ((7, 7, 3, 64), False),
        "bn1.scale": ((64,), False), "bn1.bias": ((64,), False),
    }
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}."
            first_in = cin if block == 0 else cout
            leaves.update({
                p + "conv1": ((3, 3, first_in, cout), False),
                p + "bn1.scale": ((cout,), False), p + "bn1.bias": ((cout,), False),
                p + "conv2": ((3, 3, cout, cout), False),
                p + "bn2.scale": ((cout,), False), p + "bn2.bias": ((cout,), False),
            })
            if block == 0 and first_in != cout:
                leaves.update({
                    p + "downsample.conv": ((1, 1, first_in, cout), False),
                    p + "downsample.bn.scale": ((cout,), False),
                    p + "downsample.bn.bias": ((cout,), False),
                })
        cin = cout
    leaves.update({"fc.kernel": ((512, classes), True), "fc.bias": ((classes,), False)})
    return leaves


MODELS = {"gpt2-small": gpt2_small, "resnet18": resnet18}


def num_params(leaves: dict[str, Leaf]) -> int:
    total = 0
    for shape, _ in leaves.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
