"""Orbax checkpoints of a whole training run: parameters, optimizer state, step, data position.

A checkpoint at step ``k`` is a directory ``<dir>/<k>`` with two items:

* ``state``: ``{"params", "opt_state"}`` saved as sharded arrays, so the per-device
  error-feedback buffers (``P("data")``, one row per device) are saved and restored with
  their layout, across processes too;
* ``meta``: JSON with the step, the data position ``(epoch, index)``, the run's
  configuration and a *signature* (path -> dtype[shape]) of the parameters and the
  optimizer state.

Before restoring, :meth:`Checkpointer.check` compares the stored signature with the
current run's, so a checkpoint written by a different model, optimizer, compressor or
device count is refused with a clear message instead of a shape error halfway through.

Example:
  >>> # ckpt = Checkpointer("/tmp/run")
  >>> # ckpt.save(100, params, opt_state, {"position": [0, 100]})
  >>> # meta = ckpt.check(ckpt.latest_step(), params, opt_state)
  >>> # params, opt_state = ckpt.restore(ckpt.latest_step(), params, opt_state)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lore_jax.training.errors import TrainingError, causes


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable, or does not match the run."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint's files cannot be read (damaged or cut short): an older one may do."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _raw(tree: Any) -> Any:
    """Typed PRNG keys -> their ``uint32`` data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _wrap_key(data: jax.Array, template: Any) -> jax.Array:
    impl = (jax.random.key_impl(template) if isinstance(template, jax.Array)
            else getattr(template.dtype, "_impl", None))
    return jax.random.wrap_key_data(data, impl=impl)


def _cause(e: BaseException) -> str:
    """The root cause of ``e`` in a few words: an OSError's message (``No space left on
    device``, ``Read-only file system``, ``Permission denied``), found through the
    exception's causes and contexts, or its first line."""
    for cur in causes(e):
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def signature(tree: Any) -> dict[str, str]:
    """``{path: "dtype[shape]"}`` per leaf, e.g. ``{"['dense0']['kernel']": "float32[64,256]"}``."""
    def describe(x: Any) -> str:
        dims = ",".join(str(d) for d in x.shape)
        return f"{jax.numpy.dtype(x.dtype).name if not _is_key(x) else 'key'}[{dims}]"

    return {jax.tree_util.keystr(p): describe(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_difference(saved: dict[str, str], current: dict[str, str]) -> str:
    for path in sorted(set(saved) | set(current)):
        a, b = saved.get(path, "absent"), current.get(path, "absent")
        if a != b:
            return f"{path or 'the tree'}: checkpoint {a}, this run {b}"
    return "the trees differ"


class Checkpointer:
    """Saves and restores training runs in ``directory`` (one sub-directory per step).

    Args:
      directory: where checkpoints live (created on first save).
      max_to_keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.directory = Path(directory).expanduser().resolve()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint path {self.directory} exists and is not a "
                                  f"directory.")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False),
        )

    def check_writable(self) -> None:
        """Creates the directory and writes (then removes) a probe file in it, so that a
        directory checkpoints cannot be written to is reported before training starts.

        Raises:
          CheckpointError: naming the directory and the cause (read-only file system,
            permission, no space, a file in the way).
        """
        probe = self.directory / f".lore_jax_write_probe_{jax.process_index()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(
                f"cannot write checkpoints to {self.directory}: {_cause(e)}; choose a "
                f"writable --checkpoint-dir.") from None

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, newest first."""
        if not self.directory.exists():
            return []
        self._manager.reload()
        return sorted(self._manager.all_steps(), reverse=True)

    def set_aside(self, step: int) -> Path:
        """Renames the (damaged) checkpoint ``step`` to ``damaged-STEP`` in the same
        directory, out of the way of the run that saves that step again; nothing is
        deleted. Process 0 does it; returns the new path."""
        target = self.directory / f"damaged-{step}"
        if jax.process_index() == 0:
            n = 1
            while target.exists():
                target, n = self.directory / f"damaged-{step}.{n}", n + 1
            os.replace(self.directory / str(step), target)
        self._manager.reload()
        return target

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or ``None``."""
        if not self.directory.exists():
            return None
        self._manager.reload()
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Writes checkpoint ``step`` (all processes must call it; blocks until written)."""
        meta = {**meta, "step": int(step),
                "signature": {"params": signature(params), "opt_state": signature(opt_state)}}
        state = {"params": _raw(params), "opt_state": _raw(opt_state)}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
            self._manager.wait_until_finished()
        except Exception as e:  # orbax wraps the OSError in several exception types
            previous = [s for s in self._manager.all_steps() if s != step]
            kept = (f"the newest complete checkpoint is {self.directory / str(max(previous))}"
                    if previous else "no earlier checkpoint exists")
            raise CheckpointError(f"cannot save checkpoint {self.directory / str(step)}: "
                                  f"{_cause(e)}; {kept}.") from None

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``step``."""
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for unreadable directories
            raise UnreadableCheckpoint(f"cannot read checkpoint {self.directory / str(step)}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        return dict(out["meta"])

    def check(self, step: int, params: Any, opt_state: Any,
              settings: dict[str, Any] | None = None,
              flags: dict[str, str] | None = None) -> dict[str, Any]:
        """Checks that checkpoint ``step`` fits this run; returns its metadata.

        Args:
          step: the checkpoint to check.
          params, opt_state: the current run's (templates suffice).
          settings: options that must equal those stored in the checkpoint's
            ``meta["config"]`` (e.g. ``{"compressor": "greedylore", "rank": 4}``): some
            change the meaning of the optimizer state or of the parameters (the number
            of attention heads) without changing their shapes.
          flags: how messages name a setting (``{"num_heads": "--heads"}``); the
            default is ``--`` and the name with dashes.

        Raises:
          CheckpointError: naming the first differing setting, or the first parameter or
            optimizer-state leaf that differs (a different model, optimizer, compressor,
            or device count).
        """
        meta = self.meta(step)
        saved = meta.get("signature", {})
        where = self.directory / str(step)
        stored = meta.get("config", {})
        for name, value in (settings or {}).items():
            if name in stored and stored[name] != value:
                flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
                raise CheckpointError(
                    f"checkpoint {where} was written with {flag} {stored[name]}, but this "
                    f"run has {flag} {value}; resume with the same {flag} or use another "
                    f"--checkpoint-dir.")
        if saved.get("params") != signature(params):
            diff = _first_difference(saved.get("params", {}), signature(params))
            raise CheckpointError(
                f"checkpoint {where} was written for a different model ({diff}); use the "
                f"options it was trained with or another --checkpoint-dir.")
        if saved.get("opt_state") != signature(opt_state):
            diff = _first_difference(saved.get("opt_state", {}), signature(opt_state))
            raise CheckpointError(
                f"checkpoint {where} holds a different optimizer state ({diff}); resume "
                f"with the same --compressor, --rank, --optimizer and --devices (a "
                f"checkpoint from an earlier lore_jax, whose optimizer state was laid out "
                f"differently, cannot be resumed: use another --checkpoint-dir).")
        return meta

    def restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any]:
        """Restores checkpoint ``step`` with the layout (shardings) of ``params``/``opt_state``.

        Args:
          params, opt_state: templates with the target layouts: arrays, or
            ``jax.ShapeDtypeStruct`` with ``sharding`` set.

        Returns:
          ``(params, opt_state)`` as global arrays sharded like the templates.
        """
        template = {"params": params, "opt_state": opt_state}
        def raw_abstract(x):
            if _is_key(x):  # stored as its uint32 data; keys are replicated
                data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
                return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        abstract = jax.tree.map(raw_abstract, template)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:
            raise UnreadableCheckpoint(f"cannot restore checkpoint {self.directory / str(step)}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        out = jax.tree.map(lambda t, x: _wrap_key(x, t) if _is_key(t) else x, template, out)
        return out["params"], out["opt_state"]

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
