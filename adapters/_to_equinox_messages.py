"""The messages of `ToEquinox`'s errors: what went wrong, with the path and the fix.

Kept apart from `_to_equinox.py` so that the code reads in one sitting.
"""

_NO_STATE = """\
`ToEquinox.__call__` takes the state as its last positional argument, as Equinox's
stateful layers do: `out, state = model(x, state)`. The last positional argument was
{got}. You should call `model, state = adapters.to_equinox(...)` (or
`eqx.nn.make_with_state(YourModel)(...)`) and pass that `state` last.\
"""

_STATE_NOT_LAST = """\
`ToEquinox.__call__` got an `eqx.nn.State` as positional argument {index}, but the
state must be the last positional argument: `out, state = model(*inputs, state)`.\
"""

_FOREIGN_STATE = """\
The state passed to this `ToEquinox` does not hold its collection {collection!r}: it
was made for another model. Pass the state that `adapters.to_equinox(...)` (or
`eqx.nn.make_with_state`) returned together with this model, or the state returned by
its last call.\
"""

_WRONG_STATE = """\
The state passed to this `ToEquinox` does not fit its collection {collection!r}:
{problems}
The state was probably made for another model (or edited by hand). Pass the state
that `adapters.to_equinox(...)` returned together with this model.\
"""

_CHANGED_STATE = """\
During the call, the linen module changed collection {collection!r}:
{problems}
An `eqx.nn.State` has a fixed structure, shape and dtype, so it cannot hold this
update, and the adapter will not drop it. {fix}\
"""

_FIX_GROWN = """\
If the collection grows on every call (for example
values stored with `self.sow`), declare it per call at construction,
`adapters.to_equinox(..., per_call={per_call!r})`, and ask for it at
call time with `(out, captured), state = model(x, state, capture=({collection!r},))`.\
"""

_FIX_RESHAPED = """\
Make the module keep each variable's shape and dtype:
a variable created at init must have the shape and dtype that later calls write (for
a cache, initialise with example arguments shaped like the call's inputs; for a
dtype, cast the update back to the variable's dtype).\
"""

_NEEDS_KEY = """\
The linen module asked for a key from rng stream {stream!r} ({detail}) but the call
had no `key`. Call `model(x, state, key=jax.random.key(...))`; the key is split into
the streams {streams} by `adapters.linen_rngs`.{undeclared} For a deterministic call,
switch the module's randomness off instead, e.g. with `eqx.nn.inference_mode(model)`
and `deterministic_kwarg=`/`train_kwarg=` at construction.\
"""

_ALSO_UNDECLARED = """ {stream!r} is not one of these declared
streams, so also declare it: `adapters.to_equinox(..., rng_streams={suggested!r})`."""

_UNDECLARED_STREAM = """\
The linen module asked for a key from rng stream {stream!r} ({detail}), which is not
one of the declared streams {streams}. Linen would silently fall back to its `params`
stream; the adapter never relies on that. Declare the stream at construction:
`adapters.to_equinox(..., rng_streams={suggested!r})`.\
"""

_IMMUTABLE = """\
The linen module tried to create or update a variable in collection {collection!r},
which this wrapper does not hold as state ({detail}).
State collections: {state}; trainable collections: {trainable}. Trainable collections
are read-only during a call, as `params` are in linen. If the module creates the
collection only during apply, ask for it with
`(out, captured), state = model(x, state, capture=({collection!r},))`. If it must
persist between calls (like `batch_stats`), it belongs in the state: wrap variables
that hold it (all of linen's init output, not only `params`), or initialise with
example arguments that take the code path creating it.\
"""

_TRAINABLE_WRITE = """\
The linen module tried to update a variable in collection {collection!r}, which this
wrapper holds as trainable array leaves (`trainable={trainable!r}`) ({detail}).
Trainable collections are read-only during a call, as `params` are in linen, so
the update cannot be kept, and the adapter will not drop it. If the collection is
state that the module updates (like `batch_stats`), leave it out of `trainable=` so
that it lives in the `eqx.nn.State`; or call in inference mode, where the module
does not update it.\
"""


_SOWN_STATE = """\
{name} writes to {collections} during init only because they are mutable, as
`self.sow` does, so linen's init stores them, and as state they would grow (or, with
a `reduce_fn`, accumulate) on every call. Declare them per call,
`adapters.to_equinox(..., per_call={per_call!r})`, and ask for their values at call
time with `capture=`. If they are state that must persist between calls, create them
with `self.variable(...)`, which does not depend on the collection being mutable.\
"""

_TRACED_INFERENCE = """\
The `inference` field of this `ToEquinox` is a traced array, so it cannot choose
between linen's training and inference code paths. This happens when the whole model
is passed through `jax.jit` (or another transformation) as an argument. Use
`eqx.filter_jit`, or Equinox's partition pattern, which keeps the flag a Python bool:
`arrays, static = eqx.partition(model, eqx.is_array)`, then call
`eqx.combine(arrays, static)` inside the jitted function.\
"""


_NOT_A_COLLECTION = """\
`trainable` names {names}, which {verb} not a collection of {name}: its
variables have the collections {collections}. Name the collections whose arrays
should be trained, e.g. `trainable=("params",)` (the default).\
"""

_INFERENCE_COLLISION = """\
`inference=` was given to `adapters.to_equinox`, but it is the wrapper's own flag
(the initial value of `model.inference`), and {name}.{method} takes a keyword
`inference` of its own. The wrapper maps that keyword onto its flag: linen's init
gets `inference=True`, and every call `inference=model.inference`. Leave
`inference=` out and switch modes with `eqx.nn.inference_mode(model)`; to give
linen's keyword a fixed value instead, pass `deterministic_kwarg=()` and
`inference=` at every call, `model(x, state, inference=...)`.\
"""

_VARIABLES_FIRST = """\
`ToEquinox.__call__` got a linen variables dict (collections {collections}) as its
first positional argument, as linen's `module.apply(variables, x)` takes it. The
wrapper holds the variables itself: call `out, state = model(x, state)`. To run with
other variables, build the model from them first:
`model, state = model.with_linen_variables(variables)`.\
"""

_JIT_WHOLE_MODEL = """\
A `ToEquinox` cannot be hashed (it holds dicts of arrays), so `jax.jit(model)` and
static arguments cannot take it. Use `eqx.filter_jit`, e.g.
`eqx.filter_jit(lambda m, x, s: m(x, s))(model, x, state)`, or Equinox's partition
pattern: `arrays, static = eqx.partition(model, eqx.is_array)` and call
`eqx.combine(arrays, static)` inside a function jitted with `jax.jit`.\
"""

_RAW_KEY_INPUT = """\
The linen call failed ({type}: {err}), and positional argument {index} is a
uint32[2] array, as a legacy `jax.random.PRNGKey` is. If it is a key, pass it by
keyword: `model(x, state, key=key)` (keys are keyword-only, as in Equinox).\
"""

_MISSING_ARGUMENT = """\
{name}.{method} needs an argument that the call did not give ({err}). If it
switches the module between training and inference, map it onto the wrapper's
`inference` flag at construction: `adapters.to_equinox(..., train_kwarg={arg!r})` for
a keyword meaning "training" (passed `not inference`), or
`deterministic_kwarg={arg!r}` for one meaning "inference" (passed `inference`).
Otherwise pass it with the example arguments and at every call.\
"""

_NO_PARAMS = """\
The linen module looked for a parameter that the variables do not hold ({err}).
The variables have the collections {collections}{params_hint}. Pass every collection
of linen's variables, `variables={{"params": params, ...}}`, as `module.init`
returns them.\
"""

_CAST_INPUT = """\
The call's inputs include {dtypes} arrays, and the module computed the update in
that dtype. Cast the inputs to the dtype the model was built with (e.g.
`x.astype(jnp.float32)`), as linen would store the update in the input's dtype
too; or build the model with inputs of the dtype you call it with.\
"""
