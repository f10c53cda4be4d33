"""dit_jax.utils.checksum on sharded arrays (8 simulated devices): per-shard sums equal the NumPy definition,
and the program that computes them moves no array between devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import tiny_config
from dit_jax import train
from dit_jax.training.state import init_state
from dit_jax.utils import checksum

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def numpy_fingerprints(tree):
    """The definition, on host copies of the whole arrays."""
    return {jax.tree_util.keystr(p): int(checksum.fingerprint(np.asarray(v)))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture
def mixed_tree(rng):
    """Arrays sharded over sub-axes, 2-D splits, replicated along unused axes, scalars, every element size."""
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2, 1), ("data", "fsdp_0", "fsdp_1", "tensor"))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    return {
        "f32_2d": put(rng.standard_normal((8, 12)).astype(np.float32), "fsdp_0", "fsdp_1"),
        "bf16_joint": put(rng.standard_normal((16, 6)).astype(jnp.bfloat16), ("fsdp_0", "fsdp_1")),
        "u8_3d": put(rng.integers(0, 255, (4, 4, 6), dtype=np.uint8), None, "data", "fsdp_1"),
        "i32_replicated": put(rng.integers(-5, 5, (7,), dtype=np.int32)),
        "scalar": put(np.array(3.5, np.float32)),
        "bool_all_axes": put(rng.standard_normal((8, 4)) > 0, ("data", "fsdp_0", "fsdp_1")),
        "f16_one_device": jnp.asarray(rng.standard_normal((5, 3)).astype(np.float16)),
        "numpy": np.arange(6, dtype=np.int16),
    }


def test_sharded_fingerprints_equal_the_numpy_definition(mixed_tree):
    assert checksum.tree_fingerprints(mixed_tree) == numpy_fingerprints(mixed_tree)


def test_one_flipped_bit_changes_the_sharded_fingerprint(mixed_tree):
    x = mixed_tree["f32_2d"]
    bits = np.asarray(x).view(np.uint32).copy()
    bits[5, 7] ^= 1 << 31  # the last element of some shard but the first
    flipped = jax.device_put(bits.view(np.float32), x.sharding)
    assert checksum.tree_fingerprints({"a": flipped}) != checksum.tree_fingerprints({"a": x})


def test_train_state_fsdp_sharded(rng):
    """The real thing: the tiny model's state, parameters sharded over fsdp=4 and replicated over data=2."""
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp = 2, 4
    s = train.setup(c)
    state = init_state(s.model, s.tx, jax.random.PRNGKey(0), s.state_shardings).to_dict()
    sharded = [v for v in jax.tree_util.tree_leaves(state) if len(v.sharding.device_set) > 1
               and not v.sharding.is_fully_replicated]
    assert sharded  # fsdp_min_size=64: the check covers sharded parameters
    assert checksum.tree_fingerprints(state) == numpy_fingerprints(state)
    for text in checksum.partials_hlo(state):
        assert not [c for c in COLLECTIVES if c in text], [c for c in COLLECTIVES if c in text]


def test_the_program_moves_no_array(mixed_tree):
    """Each device sums its own shard: the compiled program has no collective at all (the old one, a jit of
    the whole-array definition, all-gathered every sharded array)."""
    (text,) = checksum.partials_hlo(mixed_tree)
    assert "ENTRY" in text
    assert not [c for c in COLLECTIVES if c in text]


def test_partials_of_one_process_are_complete(mixed_tree):
    """One process holds every shard: nothing to gather, the partial sums are the checksums."""
    p = checksum.local_partials(mixed_tree)
    assert not p.needs_gather and not p.shared.any()
    assert p.total() == numpy_fingerprints(mixed_tree)
