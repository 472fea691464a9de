"""A run's checkpoints: the train state and the data iterator's position, saved together.

Orbax's `CheckpointManager` under `WORKDIR/checkpoints/` keeps the last `keep` of them and
writes the arrays asynchronously; a step is listed only once its save has finished, so a
process killed mid-save restarts from the one before. Both items of a step are restored
together: the state and exactly the batches that followed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of `tree`: the target that restored arrays take."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """Saves every `every` steps (or when forced), keeps `keep`; `close()` before exiting."""

    def __init__(self, directory: Path, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep)
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any, force: bool = False) -> bool:
        """Start saving `state` and `iterator`'s position as step `step` (if due or forced)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, state: Any, iterator: Any | None = None) -> Any:
        """The state saved at `step`, shaped and sharded like `state`; `iterator` (if given)
        is moved to the position saved with it."""
        items = {"state": ocp.args.StandardRestore(_abstract(state))}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def reached_preemption(self, step: int) -> bool:
        """Whether the processes agreed to stop at `step` (JAX's preemption service, on
        several hosts; always False on one)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for the saves in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
