"""Where arrays live: a device mesh with a ``data`` and an ``fsdp`` axis, and the sharding plan.

    place = Placement.from_config(config)          # config.mesh.shape = (data, fsdp)
    frozen = place.put(frozen)                     # by the plan below
    batch = place.put_batch(host_batch)

Plan (`Placement.shardings`):
  * every batch is split over both axes (each device gets its own rows: data parallel);
  * every pretrained weight (the ``params`` collection, frozen or not) with a dimension
    divisible by the ``fsdp`` size is sharded over ``fsdp`` along its largest such dimension;
    the train step all-gathers it where it is used (XLA inserts the collectives);
  * a LoRA pair follows its base kernel (in, out): when the kernel is split along ``in``, A
    (in, r) is split the same way; along ``out``, B (r, out) is; the other factor is replicated;
  * everything else (soft prompts, adapter alphas, scalars, 1-D tensors that do not divide)
    is replicated.
With ``fsdp = 1`` every spec names an axis of size 1: the same code runs fully replicated.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.errors import UserError

AXES = ("data", "fsdp")


def mesh_shape(shape, n_devices: int) -> tuple[int, int]:
    """(data, fsdp) from a config's ``mesh.shape``; -1 in one place means "the rest"."""
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise UserError(f"mesh.shape must be two integers (data, fsdp), got {shape!r}")
    data, fsdp = shape
    if data == -1 and fsdp > 0 and n_devices % fsdp == 0:
        data = n_devices // fsdp
    elif fsdp == -1 and data > 0 and n_devices % data == 0:
        fsdp = n_devices // data
    if data < 1 or fsdp < 1 or data * fsdp != n_devices:
        raise UserError(f"mesh.shape={tuple(shape)} does not fit the {n_devices} devices: data x "
                        f"fsdp must equal {n_devices} (-1 in one place takes the rest)")
    return data, fsdp


def _largest_divisible_dim(shape: tuple[int, ...], parts: int) -> int | None:
    """The largest dimension of `shape` that `parts` divides (the first, on ties)."""
    dims = [i for i, n in enumerate(shape) if n % parts == 0]
    return max(dims, key=lambda i: (shape[i], -i)) if dims else None


def mesh_of(config) -> tuple[int, ...] | None:
    """A config's ``mesh.shape`` (None for a config without a ``mesh`` block)."""
    mesh = config.get("mesh")
    return None if mesh is None else tuple(mesh.shape)


def check_divisible_by_devices(mesh: tuple[int, ...] | None, **batch_sizes: int) -> None:
    """The mesh shape (``config.mesh.shape``; None: the default) must fit the devices, and every
    batch size (``batch_size=32``, named as its config key) split evenly over them: a batch is
    split over every device."""
    n = jax.device_count()
    if mesh is not None:
        mesh_shape(tuple(mesh), n)
    for key, value in batch_sizes.items():
        if value and value % n:
            raise UserError(f"{key} {value} is not divisible by the {n} devices; use a multiple "
                            f"of {n}")


@dataclasses.dataclass(frozen=True)
class Placement:
    """A (data, fsdp) mesh over the devices and the sharding plan of the module docstring."""

    mesh: Mesh

    @classmethod
    def all_devices(cls, shape=(-1, 1)) -> Placement:
        devices = np.asarray(jax.devices())
        return cls(Mesh(devices.reshape(mesh_shape(shape, devices.size)), AXES))

    @classmethod
    def from_config(cls, config) -> Placement:
        return cls.all_devices(mesh_of(config) or (-1, 1))

    @property
    def fsdp(self) -> int:
        return self.mesh.shape["fsdp"]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        """Leading (batch) axis split over every device."""
        return NamedSharding(self.mesh, P(AXES))

    def put_batch(self, batch):
        """A global batch from this process's rows of it (a pytree of host arrays, leading axis
        = the rows this process feeds; with one process, the whole batch)."""
        if jax.process_count() == 1:
            return jax.device_put(batch, self.batch)
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(self.batch, np.asarray(x)), batch)

    def _split(self, ndim: int, dim: int | None) -> NamedSharding:
        if dim is None:
            return self.replicated
        return NamedSharding(self.mesh, P(*("fsdp" if i == dim else None for i in range(ndim))))

    def weight_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """A pretrained weight: split over fsdp along its largest divisible dimension."""
        if len(shape) < 1 or self.fsdp == 1:
            return self.replicated
        return self._split(len(shape), _largest_divisible_dim(tuple(shape), self.fsdp))

    def shardings(self, variables: dict) -> dict:
        """The plan for a variables tree ({"params", "lora"?, "prompt"?, ...}: whole, or its
        trainable or frozen part from `lora.split`), as a matching tree of NamedShardings."""
        out = {}
        for collection, tree in variables.items():
            if collection == "params":
                out[collection] = jax.tree_util.tree_map(
                    lambda x: self.weight_sharding(np.shape(x)), tree)
            elif collection == "lora":
                out[collection] = self._lora_shardings(tree)
            else:
                out[collection] = jax.tree_util.tree_map(lambda x: self.replicated, tree)
        return out

    def _lora_shardings(self, node):
        if not isinstance(node, dict):
            return self.replicated
        if "A" in node and "B" in node:
            a, b = np.shape(node["A"]), np.shape(node["B"])
            kernel = (*a[:-1], b[-1])  # (in, out), stacked leading axes kept
            dim = None if self.fsdp == 1 else _largest_divisible_dim(kernel, self.fsdp)
            out = {k: self._lora_shardings(v) for k, v in node.items()}
            if dim is not None and dim == len(kernel) - 1:  # split along out: B follows
                out["B"] = self._split(len(b), len(b) - 1)
            elif dim is not None:  # split along in (or a stacked axis): A follows
                out["A"] = self._split(len(a), dim)
            return out
        return {k: self._lora_shardings(v) for k, v in node.items()}

    def onto_mesh(self, tree):
        """Leaves already spread over the mesh kept as they are; the rest (arrays a jitted
        function made from constants, such as an optimizer's step count) replicated on it."""
        size = self.mesh.devices.size
        return jax.tree_util.tree_map(
            lambda x: x if len(x.sharding.device_set) == size and isinstance(
                x.sharding, NamedSharding) and x.sharding.mesh == self.mesh
            else jax.device_put(x, self.replicated), tree)

    def put(self, variables: dict) -> dict:
        """`variables` placed by the plan."""
        return jax.device_put(variables, self.shardings(variables))


def planned_bytes(tree, shardings) -> tuple[int, int]:
    """(whole, per device) bytes of `tree` (arrays or `jax.ShapeDtypeStruct`s, e.g. from
    `jax.eval_shape`) under a matching tree of shardings: a plan sized before anything is
    allocated."""
    whole = per_device = 0
    for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings),
                    strict=True):
        itemsize = np.dtype(x.dtype).itemsize
        whole += int(np.prod(x.shape)) * itemsize
        per_device += int(np.prod(s.shard_shape(x.shape))) * itemsize
    return whole, per_device


def bytes_per_device(tree) -> int:
    """Bytes of one device's shards of every array of a placed tree (from their shardings)."""
    return planned_bytes(tree, jax.tree_util.tree_map(lambda x: x.sharding, tree))[1]


def memory_report(trainable, frozen) -> dict:
    """Per-device bytes of the placed trainable and frozen trees (for results.json)."""
    return {"trainable_bytes_per_device": bytes_per_device(trainable),
            "frozen_bytes_per_device": bytes_per_device(frozen)}
