"""Rows for Equinox models from third-party packages, run inside linen through
`adapters.to_linen` / `adapters.ToLinen(make=...)` (checks in `equinox_checks`).

Every model is tiny and built here from random keys: nothing is downloaded.
"""

import jax
import jax.numpy as jnp
import numpy as np

from .checks import (
    installed,
    Spec,
)
from .equinox_checks import EquinoxCase, Method


BATCH, DIM, COND = 4, 3, 2


def _normal(shape, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape), dtype=jnp.float32)


# --- flowjax: normalising flows built by factories ---------------------------------


def _coupling_flow(key):
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow

    flow = coupling_flow(
        key, base_dist=Normal(jnp.zeros(DIM)), flow_layers=2, nn_width=8
    )
    return Method(flow, "log_prob")


def flowjax_coupling():
    return EquinoxCase(
        _coupling_flow,
        "flowjax.distributions.Transformed (coupling_flow).log_prob",
        args=(_normal((BATCH, DIM)),),
        factory=True,
        vmap_axis=0,
    )


def _autoregressive_flow(key):
    from flowjax.distributions import Normal
    from flowjax.flows import masked_autoregressive_flow

    flow = masked_autoregressive_flow(
        key,
        base_dist=Normal(jnp.zeros(DIM)),
        cond_dim=COND,
        flow_layers=2,
        nn_width=8,
    )
    return Method(flow, "sample_and_log_prob", names=("condition",))


def flowjax_autoregressive():
    return EquinoxCase(
        _autoregressive_flow,
        "flowjax.distributions.Transformed "
        "(masked_autoregressive_flow).sample_and_log_prob",
        args=(_normal((BATCH, COND), seed=1),),
        vmap_axis=0,
        needs_key=True,
    )


# --- sympy2jax: a symbolic expression with float parameters and integer buffers ----


def _symbolic(key):
    import sympy
    import sympy2jax

    x, y = sympy.symbols("x y")
    expressions = [
        2.5 * sympy.cos(x) * y**2 + sympy.Rational(1, 3) * x - 7 * sympy.exp(-y),
        0.5 * sympy.sqrt(x**2 + 1) + 4 * x * y,
    ]
    return sympy2jax.SymbolicModule(expressions)


def sympy2jax_module():
    return EquinoxCase(
        _symbolic,
        "sympy2jax.SymbolicModule",
        kwargs=dict(x=_normal((BATCH,)), y=_normal((BATCH,), seed=1)),
    )


# --- distreqx: a distribution as an Equinox module, sampled with a key -------------


def _mixture(key):
    import equinox as eqx
    from distreqx import distributions

    k_mix, k_loc, k_scale = jax.random.split(key, 3)
    components = eqx.filter_vmap(distributions.MultivariateNormalDiag)(
        jax.random.normal(k_loc, (3, DIM)),
        jnp.exp(0.1 * jax.random.normal(k_scale, (3, DIM))),
    )
    mixing = distributions.Categorical(logits=jax.random.normal(k_mix, (3,)))
    return Method(
        distributions.MixtureSameFamily(mixing, components), "sample_and_log_prob"
    )


def distreqx_mixture():
    return EquinoxCase(
        _mixture, "distreqx.distributions.MixtureSameFamily", needs_key=True
    )


# --- haliax: named axes, layers stacked and folded with a scan ---------------------


def _haliax():
    import warnings

    with warnings.catch_warnings():
        # haliax 1.4.dev453 reads `jax.experimental.shard_map`, deprecated since
        # jax 0.8, at import.
        warnings.filterwarnings(
            "ignore", "jax.experimental.shard_map is deprecated", DeprecationWarning
        )
        import haliax
        import haliax.nn
    return haliax


def _stacked_mlp(key):
    hax = _haliax()
    layers, embed = hax.Axis("layers", 2), hax.Axis("embed", DIM)
    keys = jax.random.split(key, layers.size)
    stacked = hax.nn.Stacked.init(layers, hax.nn.MLP)(embed, embed, 8, 1, key=keys)
    return Method(stacked, "fold")


def haliax_stacked():
    x = _haliax().named(_normal((BATCH, DIM)), ("batch", "embed"))
    return EquinoxCase(_stacked_mlp, "haliax.nn.Stacked[haliax.nn.MLP].fold", args=(x,))


_METHOD = (
    "`ToLinen` calls its model: a `Method` module calls the model's `{method}`"
    " (the native side calls the same)."
)


ROWS = [
    Spec(
        "flowjax/coupling_flow",
        "flowjax",
        installed("flowjax"),
        [
            "factory (ToLinen(make=...))",
            "arrays in closures",
            "integer buffers (permutations)",
            "paramax-wrapped parameters",
            "vmap_axis=0",
            "method call (log_prob)",
        ],
        flowjax_coupling,
        note=_METHOD.format(method="log_prob")
        + " The factory's model keeps arrays in closures, so a model built from"
        " shapes would leak tracers: `ToLinen` finds them (a walk of that model) and"
        " builds the model with a key at each trace instead; nothing for a user to"
        " do (this row took 45 s before the walk replaced JAX's leak check, which"
        " searched the heap at every trace; now a few seconds).",
        kind="equinox",
    ),
    Spec(
        "flowjax/masked_autoregressive_flow",
        "flowjax",
        installed("flowjax"),
        [
            "a built flow (to_linen)",
            "arrays in closures",
            "bool and integer buffers (masks, permutations)",
            "key (split per example)",
            "conditional input",
            "vmap_axis=0",
            "method call (sample_and_log_prob)",
        ],
        flowjax_autoregressive,
        note=_METHOD.format(method="sample_and_log_prob")
        + " A flow built once and wrapped by `to_linen` (the factory path is"
        " flowjax/coupling_flow's).",
        kind="equinox",
    ),
    Spec(
        "sympy2jax/SymbolicModule",
        "sympy2jax",
        installed("sympy2jax"),
        [
            "float parameters",
            "integer buffers (constants)",
            "keyword-only inputs",
            "list output",
        ],
        sympy2jax_module,
        kind="equinox",
    ),
    Spec(
        "distreqx/MixtureSameFamily",
        "distreqx",
        installed("distreqx"),
        [
            "key (no vmap_axis)",
            "no positional input",
            "filter_vmap-built components",
            "method call (sample_and_log_prob)",
        ],
        distreqx_mixture,
        note=_METHOD.format(method="sample_and_log_prob"),
        kind="equinox",
    ),
    Spec(
        "haliax/Stacked",
        "haliax",
        installed("haliax"),
        [
            "named-axis (NamedArray) inputs and outputs",
            "stacked layers folded by scan",
            "method call (fold)",
        ],
        haliax_stacked,
        note=_METHOD.format(method="fold")
        + " haliax 1.4.dev453, a pre-release: 1.3, the last release, fails to"
        " import on jax 0.10.2 (`ImportError: cannot import name 'BuiltInKeyEntry'"
        " from 'jax._src.tree_util'`). It warns `jax.core.is_constant_dim is"
        " deprecated` (DeprecationWarning) at every dot, so the row fails with"
        " warnings as errors, and `jax.experimental.shard_map is deprecated` at"
        " import (silenced here).",
        kind="equinox",
    ),
]
