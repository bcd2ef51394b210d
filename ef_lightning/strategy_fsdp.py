"""Lightning strategy for FSDP2 inside a node and EF21-Muon across nodes: ``Trainer(strategy="ef21_fsdp")``.

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (FSDP2 / ``fully_shard``, CPU and GPU) with
a 2-D device mesh ``("replicate", "shard")`` = (``num_nodes``, ``devices``): the LightningModule shards itself over
the node in ``configure_model`` (``fully_shard(block, mesh=self.device_mesh["shard"])``), FSDP2 reduce-scatters the
gradients inside the node, and an :class:`~ef_lightning.EF21Engine` with ``topology="hierarchical"`` runs EF21-Muon
across the nodes on the local shards (docs/algorithm.md §5): the slow link carries compressed messages, the fast one
FSDP2's dense traffic. Every process trains on its own data (the sampler spans all processes, as in DDP).

Checkpoints: the model (W) is written by Lightning's distributed checkpoint (a directory); each process writes its
own EF21 state (its node's M_j, G_j for its shards, the X and G it serves, the optimizer state of those, the
ledger) to ``ef21_rank{r}.pt`` inside it, atomically, and reads it back on resume (same number of nodes and
processes; no ``resume_world_size="reinit"`` here). The optimizer's state lives in those files: the distributed
checkpoint holds the model only. The distributed checkpoint itself is Lightning's (not written atomically as a
whole): a missing or damaged EF21 file, or files from different steps, make every rank raise on resume, naming the
rank and the directory.

Not supported, with a clear error: Lightning's ``FSDPStrategy`` (FSDP1, GPU only), HSDP (``fully_shard`` on the 2-D
mesh: EF21 replaces its replicate all-reduce), Accelerate's FSDP plugin (``EF21Plugin`` refuses it).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.model_parallel import _load_checkpoint
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch.distributed.device_mesh import init_device_mesh
from torch.optim import Optimizer

from ef_lightning._atomic import atomic_save, rank_state_path, read_rank_state
from ef_lightning.config import EF21Config
from ef_lightning.ef21 import EF21Engine
from ef_lightning.strategy import _EF21Driving

__all__ = ["EF21FSDPStrategy"]

MESH_DIMS = ("replicate", "shard")


class EF21FSDPStrategy(_EF21Driving, ModelParallelStrategy):
    """FSDP2 inside each node, EF21-Muon with compressed messages across nodes (see the module docstring).

    Args:
        config: an :class:`~ef_lightning.config.EF21Config`; ``None``: one built from ``options``. The topology is
            ``hierarchical`` (the only one that fits sharded parameters).
        evaluate_at_server_model: run validation during fit at X (default True; only matters when W != X).
        process_group_backend, timeout: as for :class:`~lightning.pytorch.strategies.ModelParallelStrategy`.
        **options: :class:`~ef_lightning.config.EF21Config` fields (``uplink``, ``downlink``, ``seed``, ...).

    Example::

        class Model(LightningModule):
            def configure_model(self):
                for block in self.blocks:
                    fully_shard(block, mesh=self.device_mesh["shard"])   # shard over the node's processes
                fully_shard(self, mesh=self.device_mesh["shard"])

        Trainer(strategy=EF21FSDPStrategy(uplink="top_k:0.05+natural"), accelerator="gpu", devices=8, num_nodes=4)
    """

    strategy_name = "ef21_fsdp"

    def __init__(
        self,
        config: EF21Config | None = None,
        *,
        evaluate_at_server_model: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("topology", "hierarchical")
        self.config = EF21Config.build(config, **options)
        if self.config.topology != "hierarchical":
            raise ValueError(
                f"EF21FSDPStrategy runs topology 'hierarchical' (FSDP2 shards inside a node, EF21 across nodes), got "
                f"topology={self.config.topology!r}; valid choice: 'hierarchical' (or EF21MuonStrategy for the others)"
            )
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        super().__init__(process_group_backend=process_group_backend, **kwargs)
        self.evaluate_at_server_model = evaluate_at_server_model
        self.engines = {}
        self._at_x = None

    def setup_environment(self) -> None:
        """Lightning's set-up, with the mesh named for what it is: (nodes, processes per node)."""
        super().setup_environment()
        device = self.root_device.type
        self._device_mesh = init_device_mesh(device, (self.num_nodes, self.num_processes), mesh_dim_names=MESH_DIMS)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every process is a data-parallel worker with its own data (FSDP2 averages a node's gradients)."""
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        self._start_engines(trainer)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Empty: the optimizer state of the layers a process serves is in its own EF21 file (other processes hold
        none for them, which the distributed checkpoint's optimizer format cannot express)."""
        return {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """The distributed checkpoint of the model, then this process's EF21 state in it (every process calls it)."""
        super().save_checkpoint(checkpoint, filepath, storage_options)
        engine = self.engine
        if engine is not None:
            path = rank_state_path(Path(self.broadcast(filepath)), self.global_rank)
            atomic_save({"config": self.config.to_dict(), "engine": engine.state_dict()}, path)
        self.barrier("ef21_checkpoint_saved")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The model from the distributed checkpoint, then this process's EF21 state (a missing or damaged file is
        a ValueError naming the rank and the file)."""
        path = Path(self.broadcast(checkpoint_path))
        assert self.lightning_module is not None
        checkpoint = _load_checkpoint(
            path=path,
            state={"state_dict": self.model},
            strict=self.lightning_module.strict_loading,
            weights_only=weights_only,
        )
        checkpoint.pop("optimizer_states", None)  # restored from the EF21 files below
        engine = self.engine
        if engine is not None:
            self._load_ef21(engine, path)
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Nothing: :meth:`load_checkpoint` restored each process's state."""

    def _load_ef21(self, engine: EF21Engine, directory: Path) -> None:
        """This process's EF21 state from ``directory``, with every rank agreeing: a rank whose file is missing or
        damaged, or whose state is from another step than the others' (a crash between the files of one save),
        makes every rank raise, naming the rank(s) and the directory."""
        cause: Exception | None = None
        step = -1
        try:
            state = read_rank_state(directory, self.global_rank, self.root_device, "EF21FSDPStrategy.save_checkpoint")
            engine.load_state_dict(state)
            step = int(state["step"])
        except Exception as e:  # reported below, on every rank
            cause = e
        steps = torch.tensor([step], dtype=torch.int64, device=engine.transport.device)
        everyone = [torch.zeros_like(steps) for _ in range(self.world_size)]
        torch.distributed.all_gather(everyone, steps)
        by_rank = [int(t.item()) for t in everyone]
        failed = [r for r, s in enumerate(by_rank) if s < 0]
        if failed:
            own = f" ({cause})" if cause is not None else ""
            raise ValueError(
                f"rank(s) {', '.join(map(str, failed))} could not load their EF21 state from {directory}; this is "
                f"rank {self.global_rank}{own}. Resume from another checkpoint"
            ) from cause
        if len(set(by_rank)) > 1:
            raise ValueError(
                f"the EF21 files in {directory} are from different steps (by rank: {by_rank}): a save did not "
                "complete on every rank; resume from another checkpoint"
            )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``ef21_fsdp``."""
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name, cls, description="FSDP2 inside a node, EF21-Muon compressed sync across nodes"
            )


EF21FSDPStrategy.register_strategies(StrategyRegistry)
