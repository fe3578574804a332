"""The one interface of everything stg_ext installs (a guidance session, a weak model, a restart): `remove()`
restores exactly what was there, and the handle is a context manager that removes on exit."""
from __future__ import annotations


class Handle:
    def remove(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
