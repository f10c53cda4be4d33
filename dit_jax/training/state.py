"""The training state (step, params, EMA params, optimizer state), its abstract shapes and its shardings.

Shardings are built in one place over the whole state: params and EMA by the rules of dit_jax.sharding,
each optimizer moment like the parameter it tracks (found through optax's own params/state correspondence,
`optax.tree_map_params`), everything else (counts, the step) replicated.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dit_jax import sharding as shd
from dit_jax.model import DiT, abstract_params, init_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 (): optimizer steps taken
    params: Any  # the DiT parameters
    ema_params: Any  # their exponential moving average (what samples and exports use)
    opt_state: Any  # optax state of the optimizer

    def to_dict(self) -> dict:
        """The checkpoint layout: a plain dict with the four fields."""
        return {"step": self.step, "params": self.params, "ema_params": self.ema_params,
                "opt_state": self.opt_state}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=d["step"], params=d["params"], ema_params=d["ema_params"], opt_state=d["opt_state"])


def abstract_state(model: DiT, tx: optax.GradientTransformation) -> TrainState:
    """The state as ShapeDtypeStructs: no compute, no device memory."""
    params = abstract_params(model)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, ema_params=params,
                      opt_state=jax.eval_shape(tx.init, params))


def state_shardings(state: TrainState, mesh: Mesh, sharding_cfg, tx: optax.GradientTransformation) -> TrainState:
    """A TrainState of NamedShardings for an (abstract) state; see the module docstring."""
    p_sh = shd.param_shardings(state.params, mesh, sharding_cfg)
    rep = shd.replicated(mesh)
    o_sh = optax.tree_map_params(tx, lambda _, s: s, state.opt_state, p_sh, transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=p_sh, ema_params=p_sh, opt_state=o_sh)


def init_state(model: DiT, tx: optax.GradientTransformation, rng: jax.Array, shardings: TrainState) -> TrainState:
    """A fresh state, created directly in its shardings (no full copy on one device)."""
    @functools.partial(jax.jit, out_shardings=shardings)
    def init(r):
        params = init_params(model, r)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=tx.init(params))

    return init(rng)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what a restore places the arrays onto)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
