"""What differs between the Keras backends s2vt runs on: TensorFlow (the default) and JAX.

model.py is keras.ops throughout; this module holds, one function each, what keras.ops leaves to the backend:
stateless random draws from a seed, a scan whose outputs need not look like its carry, XLA compilation of a kernel,
gradients, compiling a function of the model's weights, the training step and devices. Nothing here imports
TensorFlow on JAX, or JAX on TensorFlow. Choose the backend with KERAS_BACKEND=tensorflow|jax; on any other
(torch, numpy: their Keras lacks what the hand-written LSTM gradient needs) importing this module ends the program
with one `error:` line, exit status 2.
"""
import atexit
import contextlib
import gc
import os
import random
import sys

import keras
import numpy as np

from util.errors import DataError

BACKEND = keras.backend.backend()
SUPPORTED = ("tensorflow", "jax")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp
else:
    print(f"error: KERAS_BACKEND={BACKEND}: not supported; s2vt runs on tensorflow (the default) or jax",
          file=sys.stderr)
    raise SystemExit(2)

# Python's last collections at exit walk the 400,000 objects TensorFlow or JAX brought in, a second of CPU time on
# TensorFlow, to finalize objects in reference cycles: skipped (files close in `with`, TensorBoard's writer flushes)
atexit.register(gc.freeze)


def set_random_seed(seed):
    """Seed Python, numpy and the backend, so that the same seed gives the same initial weights (Keras's
    initialisers draw their seeds from Python's random). keras.utils.set_random_seed seeds TensorFlow too, importing
    it, which the JAX path must not."""
    if BACKEND == "tensorflow":
        keras.utils.set_random_seed(seed)
    else:
        random.seed(seed)
        np.random.seed(seed)


# ---- kernels behind one signature ----

def seed_tensor(seed, step=0):
    """A stateless seed for the draws of one step: (2,) int64 on TensorFlow, a (2,) uint32 key on JAX."""
    if BACKEND == "jax":
        return jnp.asarray([seed % 2**32, step % 2**32], jnp.uint32)
    return tf.constant([seed, step], tf.int64)


def split_seed(seed, count):
    """`count` independent seeds from one."""
    if BACKEND == "jax":
        return list(jax.random.key_data(jax.random.split(jax.random.wrap_key_data(seed), count)))
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def fold_in(seed, number):
    """A seed of its own for `number` (a replica, a step)."""
    if BACKEND == "jax":
        return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(seed), number))
    return tf.random.experimental.stateless_fold_in(seed, number)


def uniform(shape, seed, minval=0.0, maxval=1.0):
    """float32 uniform draws in [minval, maxval), a function of the seed alone."""
    if BACKEND == "jax":
        return jax.random.uniform(jax.random.wrap_key_data(seed), tuple(shape), jnp.float32, minval, maxval)
    return tf.random.stateless_uniform(shape, seed, minval, maxval)


def scan(step, carry, xs, reverse=False, differentiated=True):
    """carry, ys = scan(step, carry, xs): step(carry, x) -> (carry, y) over the leading axis of xs (a tuple of
    tensors), ys stacked along it. keras.ops.scan on TensorFlow needs ys shaped like the carry; this does not.
    differentiated=False (inside a hand-written gradient, or decoding) lets TensorFlow read xs by plain indexing,
    which costs no copy; under its autodiff that indexing would build a full-size gradient at every step."""
    if BACKEND == "jax":
        return jax.lax.scan(step, carry, xs, reverse=reverse)
    xs = tf.nest.map_structure(tf.convert_to_tensor, xs)
    flat_xs = tf.nest.flatten(xs)
    length = tf.shape(flat_xs[0])[0]
    if differentiated:
        arrays = [tf.TensorArray(x.dtype, size=length, element_shape=x.shape[1:]).unstack(x) for x in flat_xs]
        read = lambda t: [a.read(t) for a in arrays]
    else:
        read = lambda t: [x[t] for x in flat_xs]
    position = (lambda i: length - 1 - i) if reverse else (lambda i: i)

    def run(i, carry):
        return step(carry, tf.nest.pack_sequence_as(xs, read(position(i))))

    carry, first = run(0, carry)  # the first step outside the loop tells the outputs' types and shapes
    outputs = [tf.TensorArray(y.dtype, size=length, element_shape=y.shape).write(position(0), y)
               for y in tf.nest.flatten(first)]

    def body(i, carry, outputs):
        carry, y = run(i, carry)
        return i + 1, carry, [o.write(position(i), v) for o, v in zip(outputs, tf.nest.flatten(y))]

    _, carry, outputs = tf.while_loop(lambda i, *_: i < length, body, (1, carry, outputs))
    return carry, tf.nest.pack_sequence_as(first, [o.stack() for o in outputs])


def scan_until(step, carry, length, done):
    """carry, ys, steps = scan_until(step, carry, length, done): step(carry, t) -> (carry, y) for t = 0, 1, ...
    until done(carry) or `length` steps (at least one). ys stacks the steps' outputs along a leading axis of size
    `length`, zeros after the last step run: fixed shapes, and no work past the end (decoding, once every caption
    has ended)."""
    if BACKEND == "jax":
        outputs = jax.eval_shape(lambda c: step(c, jnp.int32(0))[1], carry)
        buffers = jax.tree.map(lambda y: jnp.zeros((length,) + y.shape, y.dtype), outputs)

        def body(state):
            t, carry, buffers = state
            carry, y = step(carry, t)
            return t + 1, carry, jax.tree.map(lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v, t, 0), buffers, y)

        t, carry, buffers = jax.lax.while_loop(lambda state: (state[0] < length) & ~done(state[1]), body,
                                               (jnp.int32(0), carry, buffers))
        return carry, buffers, t
    carry, first = step(carry, tf.constant(0))  # the first step outside the loop tells the outputs' types
    outputs = [tf.TensorArray(y.dtype, size=length, element_shape=y.shape).write(0, y) for y in tf.nest.flatten(first)]

    def body(t, carry, outputs):
        carry, y = step(carry, t)
        return t + 1, carry, [o.write(t, v) for o, v in zip(outputs, tf.nest.flatten(y))]

    t, carry, outputs = tf.while_loop(lambda t, carry, _: (t < length) & ~done(carry), body, (1, carry, outputs))
    stacked = [tf.pad(o.gather(tf.range(t)), [[0, length - t]] + [[0, 0]] * (o.element_shape.rank or 0))
               for o in outputs]
    return carry, tf.nest.pack_sequence_as(first, stacked), t


def batch_gather(values, indices):
    """values (batch, n, ...), indices (batch, k) -> (batch, k, ...): each row's entries picked by its indices.
    keras.ops.take_along_axis does it by broadcasting, a dozen ops on TensorFlow; beam search does it eight times a
    step."""
    if BACKEND == "jax":
        return jax.vmap(lambda v, i: v[i])(values, indices)
    return tf.gather(values, indices, batch_dims=1)


def read(variable):
    """A variable's value as a plain tensor: a custom-gradient function given the variable itself would, on
    TensorFlow, watch it and need a gradient for it of its own."""
    if BACKEND == "jax":
        return keras.ops.convert_to_tensor(variable)
    return tf.convert_to_tensor(variable)


def xla_compiled(function):
    """function compiled as one XLA kernel where that pays: TensorFlow runs elementwise chains op by op
    (Bahdanau attention's add, tanh and reduction over (batch, frames, dim): 2-3x faster fused); a JAX step is
    compiled whole anyway."""
    if BACKEND == "jax":
        return function
    return tf.function(function, autograph=False, jit_compile=True)


def host_scores(function, *arrays):
    """function(*numpy arrays) -> one score per row of the first, run on the host from inside a compiled step
    (tf.numpy_function / jax.pure_callback): the CIDEr-D rewards of self-critical training. (rows,) float32."""
    def run(*values):  # as numpy arrays: JAX may hand its own, and JAX work inside a callback can deadlock
        return np.asarray(function(*[np.asarray(v) for v in values]), np.float32)

    if BACKEND == "jax":
        return jax.pure_callback(run, jax.ShapeDtypeStruct((arrays[0].shape[0],), jnp.float32), *arrays)
    return tf.reshape(tf.numpy_function(run, list(arrays), tf.float32, stateful=False), [-1])


# ---- running the model ----

def loss_and_gradients(model, loss_fn, *args):
    """(loss, gradients of loss_fn(*args) for model.trainable_variables), eagerly, for tests and checks."""
    variables = model.trainable_variables
    if BACKEND == "jax":
        trainable = {id(v) for v in variables}
        others = [v for v in model.variables if id(v) not in trainable]  # fixed: not differentiated

        def pure(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values)) + [(v, v.value) for v in others]):
                return loss_fn(*args)

        loss, gradients = jax.value_and_grad(pure)([v.value for v in variables])
        return loss, list(gradients)
    with tf.GradientTape() as tape:
        loss = loss_fn(*args)
    return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]


def compile_function(model, function):
    """function(*arrays) compiled once per input shape (tf.function / jax.jit), reading the weights of `model` (a
    model, or a list of models that function uses together) as they are at each call."""
    if BACKEND == "jax":
        variables = [v for each in (model if isinstance(model, (list, tuple)) else [model]) for v in each.variables]

        @jax.jit
        def pure(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return function(*args)

        return lambda *args: pure([v.value for v in variables], *args)
    # no AutoGraph here or below: the loops are tf.while_loop already, and converting the Python source took 6% of
    # the CPU time of the serving, beam search and Captioner tests
    return tf.function(function, autograph=False, reduce_retracing=True)


def to_numpy(tree):
    """Every tensor of a nested structure as a numpy array."""
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


# ---- devices ----

def configure_devices():
    """TensorFlow takes GPU memory as it needs it rather than all of it at start-up (JAX preallocates 75%, its
    default; XLA_PYTHON_CLIENT_PREALLOCATE=false turns that off)."""
    if BACKEND == "tensorflow":
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)


def cache_compilations(folder):
    """Keep XLA's compiled programs in folder and reuse them whenever the same program is compiled again, in this
    process or a later one: outside jax.jit, JAX compiles every scan afresh at each call (a new step function each
    time), seconds each on a CPU, which the cache cuts to milliseconds. TensorFlow compiles nothing there."""
    if BACKEND == "jax":
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def full_float32_matmuls():
    """float32 matmuls in full float32 where the backend would use TF32 on Ampere and newer GPUs (TensorFlow's
    default) or its default matmul precision (JAX): for the tests, which compare results to 1e-4."""
    if BACKEND == "jax":
        jax.config.update("jax_default_matmul_precision", "highest")
    else:
        tf.config.experimental.enable_tensor_float_32_execution(False)


def matmuls_are_full_float32():
    if BACKEND == "jax":
        return jax.config.jax_default_matmul_precision == "highest"
    return not tf.config.experimental.tensor_float_32_execution_enabled()


def gpu_count():
    if BACKEND == "jax":
        return len([d for d in jax.devices() if d.platform == "gpu"])
    return len(tf.config.list_physical_devices("GPU"))


def hide_gpus():
    """Run on the CPU even where a GPU is visible."""
    if BACKEND == "jax":
        jax.config.update("jax_platforms", "cpu")
    else:
        tf.config.set_visible_devices([], "GPU")


def peak_device_memory():
    """Bytes of accelerator memory in use at the peak so far (first device)."""
    if BACKEND == "jax":
        return jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0)
    return tf.config.experimental.get_memory_info("GPU:0")["peak"]


def device_description():
    if BACKEND == "jax":
        return ", ".join(sorted({f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in jax.devices()}))
    return ", ".join(d.name for d in tf.config.list_logical_devices()) or "cpu"


def check_tf_config():
    """Check the TF_CONFIG variable MultiWorkerMirroredStrategy reads: a cluster of host:port lists and this
    process's task in it; anything else is a one-line DataError rather than a hang or a deep traceback."""
    import json

    text = os.environ.get("TF_CONFIG")
    if not text:
        raise DataError("TF_CONFIG: not set; --strategy multiworker needs the cluster and this worker's task in it "
                        "(docs/devices.md)")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"TF_CONFIG: not valid JSON ({error})") from None
    config = config if isinstance(config, dict) else {}
    cluster, task = config.get("cluster"), config.get("task")

    def is_address_list(value):
        return isinstance(value, list) and value and all(isinstance(a, str) and ":" in a for a in value)

    if not isinstance(cluster, dict) or not cluster or not all(map(is_address_list, cluster.values())):
        raise DataError("TF_CONFIG: \"cluster\" must map task types to non-empty lists of \"host:port\" strings")
    if set(cluster) - {"chief", "worker"} or len(cluster.get("chief", [])) > 1:
        raise DataError(f"TF_CONFIG: the cluster may hold \"worker\" tasks and one \"chief\", not {sorted(cluster)}")
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int) \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise DataError(f"TF_CONFIG: \"task\" must name a type of the cluster ({', '.join(cluster)}) and an index "
                        f"into its list, not {task!r}")


# seconds a worker may go without a heartbeat before TensorFlow's coordination service fails the run: its default,
# 10, failed a two-worker run on a busy 2-core machine (both workers alive); a crashed worker is still found, later
HEARTBEAT_TIMEOUT_S = 120


def patient_coordination_service():
    """The coordination service MultiWorkerMirroredStrategy would configure (it leaves one configured before it
    alone), with HEARTBEAT_TIMEOUT_S; TensorFlow offers no public setting for it."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    spec = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs, heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_S * 1000)


class Distribution:
    """Where training runs: one device, every local device (mirrored) or, on TensorFlow, several machines.

    replicas          devices the global batch is split over
    slices            parts the batch pipeline cuts a global batch into: one per replica on TensorFlow, one on JAX
                      (sharded over the devices by the compiled step), of which this process gathers
                      local_slices, the first being first_slice
    chief             whether this process writes the run folder
    """

    def __init__(self, name="auto"):
        if name == "auto":
            name = "mirrored" if gpu_count() > 1 else "default"
        self.name = name
        if BACKEND == "jax":
            if name == "multiworker":
                raise DataError("--strategy multiworker: needs the TensorFlow backend (KERAS_BACKEND=tensorflow); "
                                "on JAX, mirrored shards each batch over this machine's devices")
            self.devices = jax.local_devices() if name == "mirrored" else jax.local_devices()[:1]
            self.replicas = len(self.devices)
            self.slices, self.local_slices, self.first_slice = 1, 1, 0
            self.chief, self.strategy = True, None
            return
        if name == "default":
            self.strategy = tf.distribute.get_strategy()
        elif name == "mirrored":
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            self.strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
        else:
            check_tf_config()
            patient_coordination_service()
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        self.replicas = self.strategy.num_replicas_in_sync
        resolver = self.strategy.cluster_resolver
        if resolver is None or resolver.task_type is None:  # one process
            self.chief, workers, worker = True, 1, 0
        else:
            spec = resolver.cluster_spec().as_dict()
            ordered = [("chief", i) for i in range(len(spec.get("chief", [])))] + \
                      [("worker", i) for i in range(len(spec.get("worker", [])))]
            workers, worker = len(ordered), ordered.index((resolver.task_type, resolver.task_id))
            self.chief = worker == 0  # the "chief" task, else worker 0
        self.slices = self.replicas
        self.local_slices = self.replicas // workers
        self.first_slice = worker * self.local_slices

    def padding(self, batch_size):
        """(rows, width_multiple) for util.data.batches: XLA compiles one program per shape, so on JAX every batch is
        padded with empty rows to batch_size (rounded up to a multiple of the devices) and its caption width to a
        multiple of 8; TensorFlow's step takes any shape."""
        if BACKEND == "jax":
            return -(-batch_size // self.replicas) * self.replicas, 8
        return None, 1

    def scope(self):
        """Where the model and optimizer are made: one copy per replica on TensorFlow."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def agreement(self):
        """A function flag -> bool, True when the flag is set here or, across machines, on any worker: every worker
        then takes the same decision (stop now, save a best checkpoint, stop early) and none waits forever."""
        if self.strategy is None or not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return bool
        strategy, sum_ = self.strategy, tf.distribute.ReduceOp.SUM

        @tf.function
        def reduce_flags(flag):
            return strategy.reduce(sum_, strategy.run(tf.identity, args=(flag,)), axis=None) > 0

        return lambda flag: bool(reduce_flags(tf.constant(float(flag))))


def make_train_step(model, optimizer, distribution, batch_loss):
    """One optimisation step: step(slices, teacher_forcing_prob, seed) -> the global batch's loss (a device
    scalar; float() waits for it). slices: this process's replicas' (frame_features, caption_ids) numpy pairs, or
    step.prepare(slices) of them, the same as tensors on the devices.

    batch_loss(model, frame_features, caption_ids, teacher_forcing_prob, seed, global_batch) is the replica's summed
    caption loss divided by the global batch size, so summed over replicas it is the mean over the global batch and
    the step equals a single-device step on the whole batch, gradient clipping included. step.sync() writes the
    weights and optimizer state back to their Keras variables (for saving or validation); on TensorFlow they are
    there already."""
    if BACKEND == "jax":
        return _JaxTrainStep(model, optimizer, distribution, batch_loss)
    return _TensorFlowTrainStep(model, optimizer, distribution, batch_loss)


class _TensorFlowTrainStep:
    def __init__(self, model, optimizer, distribution, batch_loss):
        strategy, variables, replicas = distribution.strategy, model.trainable_variables, distribution.replicas
        self.distribution, sum_ = distribution, tf.distribute.ReduceOp.SUM

        def replica_step(frame_features, captions, teacher_forcing_prob, seed):
            context = tf.distribute.get_replica_context()
            if replicas > 1:  # each replica its own noise, dropout and sampling coins
                seed = tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)
            global_batch = context.all_reduce(sum_, tf.shape(captions)[0])
            with tf.GradientTape() as tape:
                loss = batch_loss(model, frame_features, captions, teacher_forcing_prob, seed, global_batch)
            gradients = tape.gradient(loss, variables)
            if replicas > 1:
                # Keras would clip each replica's part before summing the parts: sum and clip here, as on one device
                # (a second all-reduce), and hand it equal shares, each within the clip norm, to sum back
                gradients = context.all_reduce(sum_, gradients)
                if optimizer.global_clipnorm:
                    gradients, _ = tf.clip_by_global_norm(gradients, optimizer.global_clipnorm)
                gradients = [g / replicas for g in gradients]
            optimizer.apply_gradients(zip(gradients, variables))
            return loss

        feature_spec = tf.TensorSpec([None, model.config.frames, model.config.feature_dim], tf.float32)
        caption_spec = tf.TensorSpec([None, None], tf.int32)

        @tf.function(input_signature=[feature_spec, caption_spec, tf.TensorSpec([], tf.float32),
                                      tf.TensorSpec([2], tf.int64)], autograph=False)
        def single(frame_features, captions, teacher_forcing_prob, seed):
            return strategy.run(replica_step, args=(frame_features, captions, teacher_forcing_prob, seed))

        @tf.function(autograph=False, reduce_retracing=True)  # caption widths vary from batch to batch
        def distributed(frame_features, captions, teacher_forcing_prob, seed):
            losses = strategy.run(replica_step, args=(frame_features, captions, teacher_forcing_prob, seed))
            return strategy.reduce(sum_, losses, axis=None)

        self.single, self.distributed = single, distributed

    def prepare(self, slices):
        """A batch's slices as tensors, made ahead in util.data.batches' thread rather than at the step."""
        return [(tf.constant(frame_features), tf.constant(captions)) for frame_features, captions in slices]

    def __call__(self, slices, teacher_forcing_prob, seed):
        if self.distribution.replicas == 1:
            (frame_features, captions), = slices
            return self.single(frame_features, captions, tf.constant(teacher_forcing_prob, tf.float32), seed)
        strategy, first = self.distribution.strategy, self.distribution.first_slice

        def local(index):  # a replica's slice, with a fixed caption width within the step's trace
            return strategy.experimental_distribute_values_from_function(
                lambda context: tf.constant(slices[context.replica_id_in_sync_group - first][index]))

        return self.distributed(local(0), local(1), tf.constant(teacher_forcing_prob, tf.float32), seed)

    def sync(self):
        pass


class _JaxTrainStep:
    """The whole step (loss, gradients, clipping, Adam) as one jax.jit over the model's and optimizer's values,
    through stateless_call and stateless_apply; with several devices the batch is sharded over them and the
    weights replicated: each device's loss and gradients on its shard (jax.shard_map) are summed over the devices,
    and clipping and Adam run on the sums."""

    def __init__(self, model, optimizer, distribution, batch_loss):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.model, self.optimizer = model, optimizer
        mesh = Mesh(np.array(distribution.devices), ("batch",))
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.devices = len(distribution.devices)
        trainable, others = model.trainable_variables, model.non_trainable_variables
        sharded = self.devices > 1

        def loss_fn(trainable_values, other_values, frame_features, captions, teacher_forcing_prob, seed):
            rows = jnp.sum(jnp.any(captions != 0, axis=1))  # rows of padding count for nothing
            if sharded:  # this device's shard of the batch: every shard's rows, and draws of its own
                rows = jax.lax.psum(rows, "batch")
                seed = fold_in(seed, jax.lax.axis_index("batch"))
            mapping = list(zip(trainable, trainable_values)) + list(zip(others, other_values))
            with keras.StatelessScope(state_mapping=mapping):
                return batch_loss(model, frame_features, captions, teacher_forcing_prob, seed, rows)

        gradient_fn = shard_gradient_fn = jax.value_and_grad(loss_fn)
        if sharded:
            # each device runs the model on its shard alone and the parts are summed: left to itself, XLA's sharding
            # propagation stops at the LSTM loops and runs most of them on the whole batch on every device
            gradient_fn = jax.shard_map(
                lambda *args: jax.lax.psum(shard_gradient_fn(*args), "batch"), mesh=mesh, out_specs=PartitionSpec(),
                in_specs=(PartitionSpec(),) * 2 + (PartitionSpec("batch"),) * 2 + (PartitionSpec(),) * 2,
                check_vma=False)

        @jax.jit
        def step(trainable_values, other_values, optimizer_values, frame_features, captions, teacher_forcing_prob,
                 seed):
            loss, gradients = gradient_fn(trainable_values, other_values, frame_features, captions,
                                          teacher_forcing_prob, seed)
            trainable_values, optimizer_values = optimizer.stateless_apply(optimizer_values, gradients,
                                                                           trainable_values)
            return trainable_values, optimizer_values, loss

        self.step = step
        self.state = None

    def prepare(self, slices):
        """A batch on its devices, sharded, put there ahead in util.data.batches' thread rather than at the step."""
        return [tuple(jax.device_put(a, self.batch_sharding) for a in pair) for pair in slices]

    def __call__(self, slices, teacher_forcing_prob, seed):
        if self.state is None:  # the weights as they are now, placed once
            self.state = [jax.device_put([v.value for v in variables], self.replicated) for variables in
                          (self.model.trainable_variables, self.model.non_trainable_variables,
                           self.optimizer.variables)]
        (frame_features, captions), = self.prepare(slices)  # already there when prepared
        trainable_values, other_values, optimizer_values = self.state
        trainable_values, optimizer_values, loss = self.step(
            trainable_values, other_values, optimizer_values, frame_features, captions,
            jnp.float32(teacher_forcing_prob), seed)
        self.state = [trainable_values, other_values, optimizer_values]
        return loss

    def sync(self):
        if self.state is not None:
            for variables, values in zip((self.model.trainable_variables, self.model.non_trainable_variables,
                                          self.optimizer.variables), self.state):
                for variable, value in zip(variables, values):
                    variable.assign(value)


def summary_writer(folder):
    """A function (step, {name: float}) writing TensorBoard scalars into folder, on TensorFlow; None on JAX, whose
    runs keep their curves in history.csv and curves.png (TensorBoard's writer would import TensorFlow)."""
    if BACKEND != "tensorflow":
        return None
    writer = tf.summary.create_file_writer(str(folder))

    def write(step, scalars):
        with writer.as_default(step=step):  # flushed at its exit
            for name, value in scalars.items():
                tf.summary.scalar(name, value)

    return write
