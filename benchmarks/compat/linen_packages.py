"""Rows for linen models of packages other than transformers, chosen for their
quirks: custom array types, complex parameters, odd collections, module-level keys,
explicit keys and caches, dataclass outputs.

Every model is built here from a tiny configuration with random weights: nothing
is downloaded.
"""

import importlib.metadata
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from .checks import (
    Decoding,
    installed,
    LinenCase,
    Spec,
)


BATCH = 4


def _normal(shape, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape), dtype=dtype)


# ---------------------------------------------------------------------------------
# e3nn-jax: equivariant layers on `IrrepsArray`s (a pytree that carries its irreps
# in its tree structure).


def _irreps_input(irreps, leading, seed=0):
    import e3nn_jax as e3nn

    dim = e3nn.Irreps(irreps).dim
    return e3nn.IrrepsArray(irreps, _normal((*leading, dim), seed))


def _e3nn_batchnorm_class():
    from e3nn_jax import flax as e3nn_flax

    class BatchNorm(e3nn_flax.BatchNorm):
        """e3nn's BatchNorm, whose native `apply` without `mutable=` runs as its users
        must run it: e3nn's BatchNorm writes `batch_stats` on every call, even with
        `use_running_average=True` (it rolls the averages over the batch and only
        normalises with the old ones), so linen refuses the call unless
        `batch_stats` is mutable. The updates of such a call are dropped, as an
        inference call's are. Only `apply` differs; the wrapper gets this class too:
        in training it calls `apply` with `batch_stats` mutable (e3nn's own call),
        in inference without `mutable=` (this one)."""

        def apply(self, variables, *args, mutable=False, **kwargs):
            if mutable is False:
                out, _ = super().apply(
                    variables, *args, mutable=["batch_stats"], **kwargs
                )
                return out
            return super().apply(variables, *args, mutable=mutable, **kwargs)

    return BatchNorm


def e3nn_batchnorm():
    return LinenCase(
        _e3nn_batchnorm_class()(),
        args=(_irreps_input("4x0e + 2x1o + 1x2e", (BATCH * 2,)),),
        # `use_running_average=None` in its signature: the conventional keyword,
        # passed `inference`; a training call updates `batch_stats`.
        mode=("use_running_average", True),
        streams=(),
        init_streams=("params",),
        mutable=("batch_stats",),
    )


def e3nn_linear():
    from e3nn_jax import flax as e3nn_flax

    # Scalar weights mixed with the irreps input ("mixed" linear), and a channel
    # axis mixed in too: its parameters are named like 'w[0,0] 2x0e,6x0e'.
    return LinenCase(
        e3nn_flax.Linear("2x0e + 2x1o + 1x2e", channel_out=3),
        args=(_normal((BATCH, 5), 1), _irreps_input("0e + 1o", (BATCH, 2), 2)),
        mode=None,
        streams=(),
        init_streams=("params",),
    )


# ---------------------------------------------------------------------------------
# netket: variational wave functions, with complex parameters; the fast
# autoregressive networks sample site by site with a `cache` collection.

SITES = 6


def _netket():
    """netket, imported without its import-time changes to JAX's global settings.

    When imported, netket sets `jax_enable_x64` from its `NETKET_ENABLE_X64` flag
    (default on), which would change every later row's dtypes, and sets a global
    mesh over all devices (axis "S") from its `NETKET_SHARDING` flag (default on),
    which every later sharded computation in the process would meet. Both flags
    are set for the import only (x64 to JAX's current setting, sharding off: netket
    documents both), and the environment is left as it was. If netket was
    imported before, whatever it set stays."""
    if "netket" not in sys.modules:
        flags = {
            "NETKET_ENABLE_X64": str(int(jax.config.jax_enable_x64)),
            "NETKET_SHARDING": "0",
        }
        saved = {name: os.environ.get(name) for name in flags}
        os.environ.update(flags)
        try:
            importlib.import_module("netket")
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
    return sys.modules["netket"]


def _spins(nk):
    hilbert = nk.hilbert.Spin(0.5, SITES)
    return hilbert, hilbert.all_states()[5 : 5 + BATCH]


def netket_rbm():
    nk = _netket()
    hilbert, states = _spins(nk)
    return LinenCase(
        nk.models.RBM(alpha=2, param_dtype=jnp.complex64),
        args=(states,),
        mode=None,
        streams=(),
        init_streams=("params",),
    )


def netket_fast_arnn():
    nk = _netket()
    hilbert, states = _spins(nk)
    module = nk.models.FastARNNConv1D(
        hilbert=hilbert,
        layers=2,
        features=4,
        kernel_size=3,
        param_dtype=jnp.complex64,
    )
    return LinenCase(
        module, args=(states,), mode=None, streams=(), init_streams=("params",)
    )


def netket_lstm():
    nk = _netket()
    experimental = importlib.import_module("netket.experimental")
    hilbert, states = _spins(nk)
    # Its LSTM cells run over the sites with `nn.scan` (parameters broadcast).
    module = experimental.models.LSTMNet(
        hilbert=hilbert, layers=1, features=4, param_dtype=jnp.float32
    )
    return LinenCase(
        module, args=(states,), mode=None, streams=(), init_streams=("params",)
    )


def netket_fast_arnn_decoding(case, params):
    """Autoregressive sampling, greedy: `conditional(inputs, index)` gives the
    probabilities of each local state of site `index`, reading only site
    `index - 1` of `inputs` and caching it. The token (a local state's index) is
    put at every site, so site `index - 1` holds it whatever `index` is."""
    import equinox as eqx

    import adapters

    module = case.module
    local_states = jnp.asarray(module.hilbert.local_states, jnp.int8)

    def inputs(tokens):
        return jnp.broadcast_to(local_states[tokens], (tokens.shape[0], SITES))

    first = jnp.zeros((BATCH, 1), jnp.int32)
    cache = jax.jit(
        lambda key: module.init(key, inputs(first), 0, method="conditional")
    )(jax.random.key(1))["cache"]
    variables = {"params": params, "cache": cache}
    model, state = adapters.to_equinox(
        module, inputs(first), 0, variables=variables, init_method="conditional"
    )
    model = eqx.nn.inference_mode(model)

    def native_step(variables, tokens, t):
        p, updates = module.apply(
            variables, inputs(tokens), t, method="conditional", mutable=["cache"]
        )
        return p, {**variables, "cache": updates["cache"]}

    def wrapped_step(model, state, tokens, t):
        return model(inputs(tokens), t, state, method="conditional")

    return Decoding(
        variables, model, state, native_step, wrapped_step, first, steps=SITES
    )


# ---------------------------------------------------------------------------------
# jax-resnet: ResNets whose BatchNorm takes its mode from whether `batch_stats` is
# mutable (`self.is_mutable_collection`), with no keyword at all.


def jax_resnet():
    import jax_resnet

    module = jax_resnet.ResNet(
        block_cls=jax_resnet.ResNetBlock,
        stage_sizes=(1, 1),
        hidden_sizes=(8, 16),
        n_classes=10,
    )
    return LinenCase(
        module,
        args=(_normal((BATCH, 16, 16, 3), 3),),
        mode=None,
        streams=(),
        init_streams=("params",),
        mutable=("batch_stats",),
    )


# ---------------------------------------------------------------------------------
# flaxmodels: StyleGAN2's generator keeps a PRNG key as a module attribute (for its
# initialisers), takes its noise key as a call argument, and has two collections
# of its own: `moving_stats` (updated in training) and `noise_consts`.


def flaxmodels_stylegan2():
    from flaxmodels.stylegan2.generator import Generator

    module = Generator(
        # 4x4: the smallest, and the only one that runs on current JAX (see the
        # row's note).
        resolution=4,
        num_channels=3,
        z_dim=8,
        w_dim=8,
        mapping_layer_features=8,
        num_ws=2,
        num_mapping_layers=2,
        fmap_base=32,
        fmap_max=8,
        # float16 for the highest resolution: its `const` parameter, its noise
        # constant and the image are float16, the rest float32.
        dtype="float16",
        num_fp16_res=1,
    )
    return LinenCase(
        module,
        args=(_normal((BATCH, 8), 4),),
        kwargs=dict(rng=jax.random.PRNGKey(3)),
        mode=("train", False),
        streams=(),
        init_streams=("params",),
        mutable=("moving_stats",),
    )


# ---------------------------------------------------------------------------------
# diffusers (a release that still has its Flax models): a dataclass output, NCHW
# inputs and a `gaussian` rng stream (`self.make_rng`).


def diffusers_vae():
    from diffusers.models.vae_flax import FlaxAutoencoderKL

    module = FlaxAutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=8,
    )
    return LinenCase(
        module,
        # NCHW, as diffusers' PyTorch-shaped API takes it.
        args=(_normal((BATCH, 3, 8, 8), 5),),
        # Sampling the posterior draws from `self.make_rng("gaussian")`.
        kwargs=dict(sample_posterior=True),
        mode=("deterministic", True),
        streams=("gaussian",),
        init_streams=("params", "gaussian"),
    )


# ---------------------------------------------------------------------------------
# evosax: its problems' policy networks take their own PRNG key as a positional
# call argument; its learned evolution strategy EvoTransformer lifts attention
# blocks over an axis with `nn.vmap` (shared parameters, one dropout key).


def evosax_mlp():
    from evosax.problems.networks import MLP, tanh_output_fn

    # A continuous-action policy: evosax calls `policy.apply(params, obs, key)`;
    # the tanh head takes the key and leaves it unused (a categorical head samples
    # with it, but its integer actions would leave the checks nothing to
    # differentiate).
    return LinenCase(
        MLP(layer_sizes=(16, 4), output_fn=tanh_output_fn, layer_norm=True),
        args=(_normal((BATCH, 6), 6), jax.random.key(7)),
        mode=None,
        streams=(),
        init_streams=("params",),
    )


def evosax_evotf():
    # evosax's package import order: `learned_evolution` imports from `algorithms`,
    # which imports it back; importing `algorithms` first resolves the cycle.
    importlib.import_module("evosax.algorithms")
    from evosax.learned_evolution.evotf_tools.evo_transformer import EvoTransformer

    module = EvoTransformer(
        embed_dim=8,
        num_heads=2,
        num_latents=2,
        latent_dim=8,
        num_layers=1,
        dropout_prob=0.1,
        input_dropout_prob=0.1,
        # Its solution encoder only: each other encoder is one more attention
        # stack to compile (twice the row's time with the distribution encoder).
        use_fitness_encoder=False,
        use_dist_encoder=False,
        use_crossd_encoder=False,
    )
    batch, context, population, dims = 1, 3, 4, 2
    return LinenCase(
        module,
        args=(
            _normal((batch, context, population, dims, 3), 7),  # solutions
            _normal((batch, context, population, 2), 8),  # fitness
            _normal((batch, context, dims, 2), 9),  # distribution (unused)
        ),
        mode=("train", False),
    )


ROWS = [
    Spec(
        "e3nn-jax/BatchNorm",
        "e3nn-jax",
        installed("e3nn-jax"),
        [
            "`IrrepsArray` input and output (custom pytree)",
            "`batch_stats`",
            "`use_running_average=` call keyword (default None)",
        ],
        e3nn_batchnorm,
        note=(
            "e3nn's BatchNorm writes `batch_stats` on every call, also with "
            "`use_running_average=True` (it rolls the averages over the batch, "
            "and normalises with the stored ones), so linen refuses its inference "
            "call unless `batch_stats` is mutable. The case's module is a subclass "
            "whose `apply` without `mutable=` makes `batch_stats` mutable and drops "
            "the updates, as an inference call is meant to; the wrapper, which in "
            "inference calls `apply` without `mutable=` as linen's inference does, "
            "runs the same. With e3nn's class itself, the wrapper in inference "
            "would make `batch_stats` writable and return the rolled averages in "
            "the state."
        ),
    ),
    Spec(
        "e3nn-jax/Linear",
        "e3nn-jax",
        installed("e3nn-jax"),
        [
            "`IrrepsArray` input and output (custom pytree)",
            "two positional inputs (scalar weights, irreps)",
            "parameter names with brackets, commas and spaces",
            "no rng stream, no mode keyword",
        ],
        e3nn_linear,
    ),
    Spec(
        "netket/RBM",
        "netket",
        installed("netket"),
        [
            "complex64 parameters and output",
            "int8 spin configurations as input",
            "no rng stream, no mode keyword",
        ],
        netket_rbm,
    ),
    Spec(
        "netket/FastARNNConv1D",
        "netket",
        installed("netket"),
        [
            "complex64 parameters and output",
            "`cache` collection made by `method='conditional'` (init_method)",
            "site-by-site sampling with a traced site index",
            "`setup` with a list of submodules",
        ],
        netket_fast_arnn,
        decoding=netket_fast_arnn_decoding,
    ),
    Spec(
        "netket/LSTMNet",
        "netket",
        installed("netket"),
        [
            "`nn.scan` over the sites (`variable_broadcast='params'`)",
            "int8 spin configurations as input",
            "netket.experimental",
        ],
        netket_lstm,
    ),
    Spec(
        "jax-resnet/ResNet",
        "jax-resnet",
        installed("jax-resnet"),
        [
            "`batch_stats`",
            "mode from `is_mutable_collection('batch_stats')`, no keyword",
            "`Sequential` of modules and plain functions (`functools.partial`)",
        ],
        jax_resnet,
        note=(
            "jax-resnet's ConvBlock sets `use_running_average=not "
            "self.is_mutable_collection('batch_stats')`. This row found that the "
            "wrapper, passing every state collection as mutable, ran it in training "
            "mode under `eqx.nn.inference_mode`; fixed: in inference the state now "
            "starts read-only, as in linen's `apply(variables, x)`."
        ),
    ),
    Spec(
        "flaxmodels/StyleGAN2Generator",
        "flaxmodels",
        installed("flaxmodels"),
        [
            "module-level PRNG key (a dataclass field)",
            "noise key as a call argument (legacy uint32 key)",
            "custom collections `moving_stats` (updated) and `noise_consts`",
            "float16 parameter, constant and output beside float32",
            "`train=` call keyword",
        ],
        flaxmodels_stylegan2,
        note=(
            "flaxmodels 0.1.3 calls `jnp.reshape(..., newshape=...)`, which current "
            "JAX removed, in its up/downsampling (and in its GPT-2): every "
            "resolution above 4x4 fails natively. The case builds the 4x4 "
            "generator (mapping network, one synthesis block, noise, toRGB)."
        ),
    ),
    Spec(
        "diffusers/FlaxAutoencoderKL",
        "diffusers",
        installed("diffusers"),
        [
            "`gaussian` rng stream (`self.make_rng`), no dropout stream",
            "`FlaxDecoderOutput` (a `flax.struct` dataclass) output",
            "`ConfigMixin` module (`flax_register_to_config`)",
            "`deterministic=` call keyword (its dropout rate is fixed at 0)",
            "NCHW input",
        ],
        diffusers_vae,
        note=(
            "diffusers 0.35.2, not the latest: 0.42.1 has no Flax models left and "
            "needs huggingface_hub>=1.32, which transformers 4.57 refuses (<1.0). "
            "FlaxAutoencoderKL has no dropout setting (0.0 in its blocks), so "
            "`deterministic=` changes nothing here; the `gaussian` stream is what "
            "the keys drive."
        ),
    ),
    Spec(
        "evosax/MLP",
        "evosax",
        installed("evosax"),
        [
            "the module's own PRNG key (`key`) as a positional call argument",
            "LayerNorm after the output function",
            "no rng stream, no mode keyword",
        ],
        evosax_mlp,
        note=(
            "evosax's networks take their own PRNG key, named `key`, as their "
            "second positional argument. This row found that the wrapper refused a "
            "typed key there as a misplaced `key=`; fixed: a key in the position of "
            "a key-named parameter is the module's input."
        ),
    ),
    Spec(
        "evosax/EvoTransformer",
        "evosax",
        installed("evosax"),
        [
            "`nn.vmap` lifted blocks (`variable_axes={'params': None}`, "
            "`split_rngs={'dropout': False}`)",
            "dropout stream",
            "`train=` call keyword, passed positionally to submodules",
            "output: an array and a dict of lists of None (attention maps off)",
        ],
        evosax_evotf,
    ),
]
