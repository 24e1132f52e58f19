"""The speed kernels behind model.py's math, one function each. Each computes what its docstring's formula says;
tests/test_speed_equivalence.py checks them through the whole model: its StraightforwardS2VT is the plain version
(keras.ops one step at a time, the backend's own gradients), and the loss, every gradient and the captions agree.

- matmul, sequence_matmul: matmul_dtype="bfloat16" runs the large matmuls in bfloat16 (weights, gates and cell
  states stay float32); large matmuls ran 1.75x faster on a Xeon with AVX512-BF16 (docs/speed.md); GPUs: not
  measured.
- lstm_sequence: an LSTM over precomputed input gates with a hand-written backward pass (keras.ops.custom_gradient):
  one recurrent matmul per step, and the recurrent kernel's gradient as one matmul after the loop rather than a
  small one per step.
- additive_attention: Bahdanau attention's forward and backward each one XLA-compiled kernel; the backward recomputes
  tanh(W1 h_s + W2 h_t) rather than keeping a (batch, frames, dim) tensor per decoder step.
"""
from keras import ops

from util import backend

MATMUL_DTYPES = ("float32", "bfloat16")


def lstm_cell(gates, c):
    """LSTM nonlinearity on gate pre-activations (batch, 4*units), gates ordered (input, forget, cell, output).
    Returns h, c and the activated gates (batch, 4*units), which the backward pass reuses."""
    i, f, g, o = ops.split(gates, 4, axis=-1)
    i, f, g, o = ops.sigmoid(i), ops.sigmoid(f), ops.tanh(g), ops.sigmoid(o)
    c = f * c + i * g
    return o * ops.tanh(c), c, ops.concatenate([i, f, g, o], -1)


def matmul(a, b, dtype="float32"):
    """a @ b with both cast to dtype, result float32 (bfloat16: faster on CPUs with AVX512-BF16, docs/speed.md);
    gradients flow through the casts."""
    if dtype == "float32":
        return ops.matmul(a, b)
    return ops.cast(ops.matmul(ops.cast(a, dtype), ops.cast(b, dtype)), "float32")


def sequence_matmul(x, kernel, dtype="float32"):
    """(..., in) @ (in, out) -> (..., out) as one 2-d matmul."""
    flat = matmul(ops.reshape(x, (-1, ops.shape(x)[-1])), kernel, dtype)  # (everything else, out)
    return ops.reshape(flat, (*ops.shape(x)[:-1], ops.shape(kernel)[-1]))


def lstm_sequence(input_gates, h, c, recurrent_kernel, dtype="float32"):
    """Run an LSTM over precomputed input gates (time, batch, 4*units) from state (h, c).
    Returns outputs (time, batch, units), the last h and the last c. Matmuls run in dtype; gates and cell states
    stay float32."""
    return _LSTM_SEQUENCES[dtype](input_gates, h, c, recurrent_kernel)


def _lstm_sequence_with_gradient(dtype):
    @ops.custom_gradient
    def lstm_sequence(input_gates, h0, c0, recurrent_kernel):
        kernel = ops.cast(recurrent_kernel, dtype)  # cast once, not per step

        def step(state, gates):
            h, c, activated = lstm_cell(gates + matmul(state[0], kernel, dtype), state[1])
            return (h, c), (h, c, activated)

        (h, c), (outputs, cells, activated) = backend.scan(step, (h0, c0), input_gates, differentiated=False)

        def grad(*upstream):
            # TensorFlow hands one gradient per output, JAX one tuple of them; an unused output's may be None
            d_outputs, d_h, d_c = upstream[0] if len(upstream) == 1 else upstream
            d_outputs = ops.zeros_like(outputs) if d_outputs is None else d_outputs
            d_h = ops.zeros_like(h0) if d_h is None else d_h
            d_c = ops.zeros_like(c0) if d_c is None else d_c
            kernel_t = ops.transpose(kernel)
            previous_c = ops.concatenate([c0[None], cells[:-1]], 0)  # (time, batch, units)

            def back(state, step_values):
                d_h, d_c = state
                activated_t, c_t, previous_c_t, d_output = step_values
                i, f, g, o = ops.split(activated_t, 4, axis=-1)
                tanh_c = ops.tanh(c_t)
                d_h = d_h + d_output
                d_c = d_c + d_h * o * (1.0 - tanh_c * tanh_c)
                d_gates = ops.concatenate([d_c * g * i * (1.0 - i), d_c * previous_c_t * f * (1.0 - f),
                                           d_c * i * (1.0 - g * g), d_h * tanh_c * o * (1.0 - o)], -1)
                return (matmul(d_gates, kernel_t, dtype), d_c * f), d_gates

            (d_h, d_c), d_gates = backend.scan(back, (d_h, d_c), (activated, cells, previous_c, d_outputs),
                                               reverse=True, differentiated=False)  # d_gates (time, batch, 4*units)
            units = ops.shape(h0)[-1]
            previous_h = ops.reshape(ops.concatenate([h0[None], outputs[:-1]], 0), (-1, units))  # (time*batch, units)
            d_recurrent = matmul(ops.transpose(previous_h), ops.reshape(d_gates, (-1, 4 * units)), dtype)
            return d_gates, d_h, d_c, d_recurrent

        return (outputs, h, c), grad

    return lstm_sequence


_LSTM_SEQUENCES = {dtype: _lstm_sequence_with_gradient(dtype) for dtype in MATMUL_DTYPES}


@backend.xla_compiled  # the add, tanh and reduction over (batch, frames, dim) as one kernel
def _additive_forward(keys, encoder_outputs, projected_query, v):
    scores = ops.matmul(ops.tanh(keys + projected_query[:, None, :]), v[:, None])[:, :, 0]  # (batch, frames)
    weights = ops.softmax(scores, axis=-1)
    return weights, ops.matmul(weights[:, None, :], encoder_outputs)[:, 0]


@backend.xla_compiled
def _additive_backward(keys, encoder_outputs, projected_query, v, weights, d_weights, d_context):
    d_weights = d_weights + ops.matmul(encoder_outputs, d_context[:, :, None])[:, :, 0]  # (batch, frames)
    d_scores = weights * (d_weights - ops.sum(weights * d_weights, -1, keepdims=True))
    activation = ops.tanh(keys + projected_query[:, None, :])  # recomputed: storing it costs batch*frames*dim a step
    d_keys = d_scores[:, :, None] * v * (1.0 - activation * activation)  # (batch, frames, dim)
    return (d_keys, weights[:, :, None] * d_context[:, None, :], ops.sum(d_keys, 1),
            ops.einsum("bf,bfa->a", d_scores, activation))


@ops.custom_gradient
def additive_attention(keys, encoder_outputs, projected_query, v):
    """Bahdanau: keys (batch, frames, dim) = W1 h_s, projected_query (batch, dim) = W2 h_t
    -> weights (batch, frames), softmax over frames, and context (batch, hidden)."""
    weights, context = _additive_forward(keys, encoder_outputs, projected_query, v)

    def grad(*upstream):
        d_weights, d_context = upstream[0] if len(upstream) == 1 else upstream
        d_weights = ops.zeros_like(weights) if d_weights is None else d_weights
        d_context = ops.zeros_like(context) if d_context is None else d_context
        return _additive_backward(keys, encoder_outputs, projected_query, v, weights, d_weights, d_context)

    return (weights, context), grad


@backend.xla_compiled
def multiplicative_attention(encoder_outputs, projected_query):
    """Luong general: projected_query (batch, hidden) = h_t^T W -> weights (batch, frames), context (batch, hidden)."""
    weights = ops.softmax(ops.matmul(encoder_outputs, projected_query[:, :, None])[:, :, 0], axis=-1)
    return weights, ops.matmul(weights[:, None, :], encoder_outputs)[:, 0]
