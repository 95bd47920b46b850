"""Small Flax NNX models for the training tasks: an MLP, a CNN and a character transformer.

Each model is an ``nnx.Module`` holding only ``nnx.Param`` variables (no dropout or batch
statistics), so a training step needs nothing but the parameters. Sub-modules get
string names (``dense0``, ``block1``, ...), so :func:`split` gives a plain nested dict of
arrays with string keys, which optax, ``shard_map`` specs and orbax all take as is.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = MLP(64, (32,), 10, rngs=nnx.Rngs(0))
  >>> apply, params = split(model)
  >>> apply(params, jnp.zeros((5, 8, 8, 1))).shape
  (5, 10)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lore_jax import _xla

Params = dict[str, Any]


class MLP(nnx.Module):
    """A ReLU multilayer perceptron; inputs of any shape are flattened per example.

    Args:
      in_features: features of a flattened example (e.g. 64 for 8x8 digits).
      hidden: widths of the hidden layers.
      out_features: classes or regression targets.
      rngs: ``nnx.Rngs`` for initialisation.

    Call: ``(batch, *input_shape) -> (batch, out_features)``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, *,
                 rngs: nnx.Rngs):
        widths = (in_features, *hidden, out_features)
        self.num_layers = len(widths) - 1
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            setattr(self, f"dense{i}", nnx.Linear(a, b, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i in range(self.num_layers):
            x = getattr(self, f"dense{i}")(x)
            if i < self.num_layers - 1:
                x = jax.nn.relu(x)
        return x


class CNN(nnx.Module):
    """Two 3x3 conv blocks (ReLU, 2x2 average pool), global average pool, two dense layers.

    Global pooling makes it work on any image size (8x8 digits, 28x28 MNIST, 32x32 CIFAR).

    Call: ``(batch, height, width, in_channels) -> (batch, out_features)``.
    """

    def __init__(self, in_channels: int, out_features: int, *, features: Sequence[int] = (32, 64),
                 hidden: int = 128, rngs: nnx.Rngs):
        self.conv0 = nnx.Conv(in_channels, features[0], (3, 3), rngs=rngs)
        self.conv1 = nnx.Conv(features[0], features[1], (3, 3), rngs=rngs)
        self.dense0 = nnx.Linear(features[1], hidden, rngs=rngs)
        self.dense1 = nnx.Linear(hidden, out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in (self.conv0, self.conv1):
            x = jax.nn.relu(conv(x))
            if min(x.shape[1:3]) >= 2:
                x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.mean(axis=(1, 2))
        return self.dense1(jax.nn.relu(self.dense0(x)))


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention with a causal mask: ``(batch, seq, d) -> (batch, seq, d)``."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, h, d // h), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (b, t, h, d/h)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h).astype(x.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))


class Block(nnx.Module):
    """A pre-LayerNorm transformer block: attention and a GELU MLP, each residual."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.norm0 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attention = CausalSelfAttention(d_model, num_heads, rngs=rngs)
        self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm0(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm1(x))))


class CharTransformer(nnx.Module):
    """A small decoder-only transformer language model over characters.

    Args:
      vocab_size: number of distinct tokens.
      seq_len: the longest sequence (learned position embeddings).
      d_model, num_heads, num_layers: width, attention heads and depth.

    Call: ``(batch, seq) int tokens -> (batch, seq, vocab_size)`` next-token logits.
    """

    def __init__(self, vocab_size: int, seq_len: int, *, d_model: int = 64, num_heads: int = 4,
                 num_layers: int = 2, rngs: nnx.Rngs):
        self.token_embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.position_embed = nnx.Embed(seq_len, d_model, rngs=rngs)
        self.num_layers = num_layers
        for i in range(num_layers):
            setattr(self, f"block{i}", Block(d_model, num_heads, rngs=rngs))
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.token_embed(tokens) + self.position_embed(jnp.arange(tokens.shape[1]))
        for i in range(self.num_layers):
            x = getattr(self, f"block{i}")(x)
        return self.head(self.norm(x))


def create(factory: Callable[[], nnx.Module]) -> tuple[Callable[[Params, jax.Array], jax.Array],
                                                     Params]:
    """Builds ``factory()`` in one jitted call; returns ``(apply, params)`` like :func:`split`.

    Constructing an NNX module eagerly compiles one small XLA program per initialiser and
    shape; tracing the whole construction compiles once (as a program that runs once,
    :func:`lore_jax._xla.run_once`).

    Example:
      >>> apply, params = create(lambda: MLP(4, (8,), 2, rngs=nnx.Rngs(0)))
      >>> apply(params, jnp.ones((3, 4))).shape
      (3, 2)
    """
    apply, _ = abstract(factory)
    params = _xla.run_once(lambda: split(factory())[1])
    return apply, params


def abstract(factory: Callable[[], nnx.Module]) -> tuple[Callable[[Params, jax.Array], jax.Array],
                                                       Params]:
    """Like :func:`create`, with ``jax.ShapeDtypeStruct`` parameters (nothing is computed)."""
    return split(nnx.eval_shape(factory))


def split(model: nnx.Module) -> tuple[Callable[[Params, jax.Array], jax.Array], Params]:
    """Splits an NNX model into a pure ``apply(params, x)`` and its parameters.

    Returns:
      ``apply``: a pure function of ``(params, inputs)`` (jit- and grad-friendly), and
      ``params``: the model's ``nnx.Param`` values as a nested dict of arrays.
    """
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, nnx.State(params))(x)

    return apply, params
