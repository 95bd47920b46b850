"""Named training tasks: a dataset, the model that fits it, and sensible defaults.

=============== ======================================= ============ ========================
task            data                                    model        needs ``--data``
=============== ======================================= ============ ========================
digits          scikit-learn's bundled 8x8 digits       mlp (cnn)    no
classification  generated 32-feature, 4-class problem   mlp          no
regression      generated 32-feature, 4-target problem  mlp          no
lm              byte-level language model on real text  transformer  optional: a text file
                (default: the Python standard                        or a directory
                library's source, held out by file)
charlm          character corpus (bundled 8 KB text)    transformer  optional: a text file
mnist           MNIST IDX files                         mlp (cnn)    yes: their directory
cifar10         CIFAR-10 python batches                 cnn (mlp)    yes: their directory
=============== ======================================= ============ ========================

``lm`` is the language-model workload (:func:`data_lib.text_corpus`): UTF-8 bytes of
about 4 MiB of Python source, test files never seen in training; by default a
transformer of width 64, 4 heads, 2 layers over 64-byte windows (``--d-model``,
``--heads``, ``--layers``, ``--seq-len``), 600 steps of global batch 64 at learning rate
3e-3. ``charlm`` stays for fast tests only: models memorise its bundled text, so its
held-out loss says nothing about quality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lore_jax.training import data as data_lib
from lore_jax.training import models
from lore_jax.training.errors import TrainingError


class TaskDefaults(NamedTuple):
    """Per-task defaults for options the user leaves out."""

    model: str
    steps: int
    batch_size: int
    learning_rate: float


TASKS: dict[str, TaskDefaults] = {
    "digits": TaskDefaults("mlp", 400, 128, 3e-3),
    "classification": TaskDefaults("mlp", 600, 128, 1e-3),
    "regression": TaskDefaults("mlp", 600, 128, 1e-3),
    "lm": TaskDefaults("transformer", 600, 64, 3e-3),
    "charlm": TaskDefaults("transformer", 400, 32, 3e-3),
    "mnist": TaskDefaults("mlp", 1000, 128, 1e-3),
    "cifar10": TaskDefaults("cnn", 2000, 128, 1e-3),
}
MODELS = ("mlp", "cnn", "transformer")


def load_data(task: str, path: str | None = None, seq_len: int = 64) -> data_lib.Dataset:
    """The dataset of ``task`` (see the table above).

    Args:
      task: a name in :data:`TASKS`.
      path: the file or directory the task reads (``--data``); optional for ``lm`` and
        ``charlm``, required for ``mnist`` and ``cifar10``, ignored otherwise.
      seq_len: tokens per example of ``lm`` and ``charlm``.

    Raises:
      TrainingError: an unknown task, or a task that needs ``path`` without it.
    """
    if task not in TASKS:
        raise TrainingError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if task == "digits":
        return data_lib.digits()
    if task == "classification":
        return data_lib.synthetic_classification()
    if task == "regression":
        return data_lib.synthetic_regression()
    if task == "lm":
        return data_lib.text_corpus(path, seq_len=seq_len)
    if task == "charlm":
        return data_lib.char_corpus(path, seq_len=seq_len)
    if path is None:
        raise TrainingError(f"task {task!r} reads files you already have: pass their "
                            f"directory with --data DIR (nothing is downloaded).")
    return data_lib.mnist(path) if task == "mnist" else data_lib.cifar10(path)


def make_model(
    name: str, dataset: data_lib.Dataset, seed: int, hidden: Sequence[int] = (256, 256), *,
    d_model: int = 64, num_heads: int = 4, num_layers: int = 2,
) -> nnx.Module:
    """Builds model ``name`` ("mlp", "cnn" or "transformer") sized for ``dataset``.

    Call it inside :func:`models.create` (``models.create(lambda: make_model(...))``) to
    initialise it with one compilation.

    Args:
      name: the model.
      dataset: fixes the input shape and the outputs (classes or vocabulary).
      seed: seeds the initialisation.
      hidden: the MLP's hidden widths.
      d_model, num_heads, num_layers: the transformer's width, attention heads and
        blocks (``--d-model``, ``--heads``, ``--layers``); ``d_model`` must be divisible
        by ``num_heads``.

    Raises:
      TrainingError: a model that does not fit the data (e.g. a CNN on tabular data), or
        a bad transformer size.

    Example:
      >>> lm = make_model("transformer", data_lib.text_corpus(seq_len=16), seed=0,
      ...                 d_model=32, num_heads=2, num_layers=1)
      >>> lm.token_embed.embedding.shape, lm.num_layers
      ((256, 32), 1)
    """
    check_model(name, dataset)
    rngs = nnx.Rngs(seed)
    shape = dataset.input_shape
    if name == "mlp":
        size = 1
        for d in shape:
            size *= d
        return models.MLP(size, tuple(hidden), dataset.num_outputs, rngs=rngs)
    if name == "cnn":
        return models.CNN(shape[-1], dataset.num_outputs, rngs=rngs)
    check_transformer_size(d_model, num_heads, num_layers)
    return models.CharTransformer(dataset.num_outputs, shape[0], d_model=d_model,
                                  num_heads=num_heads, num_layers=num_layers, rngs=rngs)


def check_transformer_size(d_model: int, num_heads: int, num_layers: int) -> None:
    """Raises :class:`TrainingError` unless the sizes make a transformer.

    Example:
      >>> check_transformer_size(30, 4, 2)
      Traceback (most recent call last):
      ...
      lore_jax.training.errors.TrainingError: --d-model 30 is not divisible by --heads 4; ...
    """
    for flag, value in (("--d-model", d_model), ("--heads", num_heads),
                        ("--layers", num_layers)):
        if value < 1:
            raise TrainingError(f"{flag} must be at least 1, got {value}.")
    if d_model % num_heads:
        raise TrainingError(f"--d-model {d_model} is not divisible by --heads {num_heads}; "
                            f"choose a width that is a multiple of the heads (e.g. --d-model "
                            f"{num_heads * max(1, round(d_model / num_heads))}).")


def check_model(name: str, dataset: data_lib.Dataset) -> None:
    """Raises :class:`TrainingError` unless model ``name`` fits ``dataset``."""
    shape = dataset.input_shape
    if name not in MODELS:
        raise TrainingError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    if dataset.kind == "language_model" and name != "transformer":
        raise TrainingError(f"model {name!r} does not fit a language-model task; use "
                            f"--model transformer.")
    if name == "cnn" and len(shape) != 3:
        raise TrainingError(f"model 'cnn' needs images (height, width, channels); task "
                            f"{dataset.name!r} has inputs of shape {shape}. Use --model mlp.")
    if name == "transformer" and dataset.kind != "language_model":
        raise TrainingError(f"model 'transformer' is a language model; task "
                            f"{dataset.name!r} needs --model mlp or cnn.")


def describe(dataset: data_lib.Dataset) -> dict[str, Any]:
    """A short JSON-able description of a dataset."""
    return {"name": dataset.name, "kind": dataset.kind, "train": len(dataset.x_train),
            "test": len(dataset.x_test), "input_shape": list(dataset.input_shape),
            "outputs": dataset.num_outputs}


Metrics = dict[str, jax.Array]


def loss_fn(kind: str, apply_fn: Callable[[Any, jax.Array], jax.Array]
            ) -> Callable[[Any, tuple], tuple[jax.Array, Metrics]]:
    """The loss of a dataset kind, for :func:`lore_jax.data_parallel` with ``has_aux``.

    ``loss(params, batch) -> (loss, metrics)`` on a batch ``(x, y)`` or ``(x, y, weights)``
    (``(b,)`` weights: 1 for real examples, 0 for padding). The loss, and each metric, is
    a weighted sum over the batch's examples divided by its size ``b``; ``metrics`` holds
    ``"accuracy"`` (the correct share; not for regression) and ``"weight"`` (the weight
    total over ``b``, 1 without weights), so that :func:`weighted_means` of any average
    of them over equal-sized shards is the weighted mean over the examples.

    The loss per example: ``"classification"`` (``outputs (b, classes)``, integer
    ``targets (b,)``) softmax cross-entropy; ``"regression"`` (``outputs`` and ``targets``
    ``(b, d)``) squared error summed over ``d``; ``"language_model"`` (``(b, t, vocab)``
    logits, ``(b, t)`` tokens) cross-entropy averaged over ``t``.

    Args:
      kind: :attr:`~lore_jax.training.data.Dataset.kind`.
      apply_fn: ``apply(params, x) -> outputs`` (:func:`models.create`).

    Returns:
      The loss function.

    Example:
      >>> # train = lore_jax.data_parallel(loss_fn("classification", apply), tx, mesh,
      >>> #                                has_aux=True)
    """

    def loss(params: Any, batch: tuple) -> tuple[jax.Array, Metrics]:
        x, y, *rest = batch
        outputs = apply_fn(params, x)
        weights = rest[0] if rest else jnp.ones(x.shape[:1], jnp.float32)
        metrics: Metrics = {}
        if kind == "regression":
            per_example = jnp.sum((outputs - y) ** 2, axis=-1)
        else:
            per_example = optax.softmax_cross_entropy_with_integer_labels(outputs, y)
            correct = (jnp.argmax(outputs, -1) == y).astype(jnp.float32)
            if kind == "language_model":
                per_example, correct = per_example.mean(-1), correct.mean(-1)
            metrics["accuracy"] = jnp.sum(correct * weights) / x.shape[0]
        metrics["weight"] = jnp.sum(weights) / x.shape[0]
        return jnp.sum(per_example * weights) / x.shape[0], metrics

    return loss


def weighted_means(loss: Any, metrics: dict[str, Any]) -> dict[str, float]:
    """``{"loss", "accuracy"?}``: the weighted means from :func:`loss_fn`'s outputs (or
    their sums over equal-sized batches), as Python floats."""
    loss, metrics = jax.device_get((loss, metrics))
    weight = float(metrics["weight"])
    out = {"loss": float(loss) / weight}
    if "accuracy" in metrics:
        out["accuracy"] = float(metrics["accuracy"]) / weight
    return out
