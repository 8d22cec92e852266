"""The one exception family of the package."""


class AdapterError(ValueError):
    """Raised when a model, its variables or its state cannot be adapted.

    Every message names the collection, the path inside it, what was expected and
    what was got, and how to fix it. A subclass of `ValueError`, so code that already
    catches `ValueError` keeps working.
    """


class AdapterTypeError(AdapterError, TypeError):
    """An [`adapters.AdapterError`][] raised where an argument has the wrong type."""
