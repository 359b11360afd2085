"""Session 44: the flat working buffer's int32 positions (``sparse._Layout``) refuse trees past their range."""
import jax
import jax.numpy as jnp
import pytest

from mlsys_jax.comm import sidco, sparse


def test_layout_accepts_the_largest_padded_buffer_and_refuses_one_tile_more():
  lay = sparse._Layout([2**31 - 4096], [[0]])
  assert lay.n_pad == 2**31 - 4096 and int(lay.tile_limit.max()) == 2**31 - 4096
  with pytest.raises(ValueError, match=r"at most 2147479552 padded entries fit"):
    sparse._Layout([2**31 - 4095], [[0]])


def test_layout_counts_the_padding_of_every_segment():
  # two segments of 2**30 - 4095 entries each pad to 2**30 apiece: 2**31 padded entries, one tile too many
  sizes = [2**30 - 4095, 2**30 - 4095]
  assert sum(sizes) < 2**31 - 4096
  with pytest.raises(ValueError, match=r"in 2 leaves, 2147483648 in the padded flat buffer"):
    sparse._Layout(sizes, [[0], [1]])
  sparse._Layout(sizes, [[0, 1]])   # (one segment: 2**31 - 8190 real entries pad to 2**31 - 4096: fits)


@pytest.mark.parametrize("kw", [{}, {"flat_state": True}, {"per_tensor": True}])
def test_sidco_update_refuses_a_tree_past_int32_with_a_clear_error(kw):
  g = {"a": jax.ShapeDtypeStruct((2**30,), jnp.float32), "b": jax.ShapeDtypeStruct((2**30,), jnp.float32)}
  tx = sidco(0.001, **kw)
  state = jax.eval_shape(tx.init, g)
  with pytest.raises(ValueError, match=r"int32, so at most 2147479552 padded entries fit"):
    jax.eval_shape(tx.update, g, state)
