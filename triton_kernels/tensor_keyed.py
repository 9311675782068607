"""Values kept for a tensor outside it: not as an attribute (``torch.save`` would pickle it with
the tensor) but in a dict keyed by ``id(tensor)``, with a weak reference so that an entry goes
with its tensor and is never handed to a later tensor that reuses the id."""
import weakref


class TensorKeyed(dict):
    """``id(tensor) -> (weak reference to the tensor, value)``."""

    def value(self, tensor, default=None):
        """The value kept for this very tensor, else ``default``."""
        entry = self.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else default

    def keep(self, tensor, value):
        """Keep ``value`` for ``tensor`` (replacing any earlier one) and return it."""
        forget = weakref.ref(tensor, lambda _, key=id(tensor): self.pop(key, None))
        self[id(tensor)] = (forget, value)
        return value
