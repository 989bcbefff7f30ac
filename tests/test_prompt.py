"""On-device tag prompt construction vs a plain-Python reference."""
import jax
import numpy as np
import pytest

from aligncap_jax.models import prompt


def _reference(on, tokens, lens, comma, bar, eos, max_len):
  seq = []
  for v in np.nonzero(on)[0]:
    seq += list(tokens[v, :lens[v]]) + [comma]
  if seq:
    seq[-1] = bar
  else:
    seq = [bar]
  seq = seq[:max_len - 1] + [eos]
  out = np.zeros(max_len, np.int32)
  out[:len(seq)] = seq
  mask = np.zeros(max_len, np.int32)
  mask[:len(seq)] = 1
  return out, mask


@pytest.mark.parametrize("max_len", [4, 8, 32])
def test_prompt_matches_reference(max_len):
  rng = np.random.default_rng(0)
  v, lt = 12, 3
  lens = rng.integers(1, lt + 1, size=v).astype(np.int32)
  tokens = np.zeros((v, lt), np.int32)
  for i in range(v):
    tokens[i, :lens[i]] = rng.integers(10, 100, size=lens[i])
  on = rng.random((6, v)) < 0.3
  on[0] = False          # no tag at all -> [bar, eos]
  on[1] = True           # everything -> truncated, EOS kept last
  toks, mask = jax.jit(prompt.build_prompt_on_device, static_argnums=6)(
      on, tokens, lens, 3, 4, 1, max_len)
  for i in range(on.shape[0]):
    want_t, want_m = _reference(on[i], tokens, lens, 3, 4, 1, max_len)
    np.testing.assert_array_equal(np.asarray(toks[i]), want_t)
    np.testing.assert_array_equal(np.asarray(mask[i]), want_m)
  assert list(np.asarray(toks[0, :2])) == [4, 1]
