"""Where an object (a pipeline or a denoiser) records the guidance session attached to it: one attribute, one
session, for every kind of session (hooks on denoisers, or a swapped guider)."""
from __future__ import annotations

from typing import Any, Optional

SESSION_ATTR = "_stg_ext_session"
OWNER_ATTR = "_stg_ext_session_for"  # id() of the object the session was recorded on: a deepcopy keeps the old id


def session_of(obj: Any) -> Optional[Any]:
    return getattr(obj, SESSION_ATTR, None)


def record(obj: Any, session: Any) -> None:
    setattr(obj, SESSION_ATTR, session)
    setattr(obj, OWNER_ATTR, id(obj))


def copied(obj: Any) -> bool:
    """`obj` carries a session recorded on another object: it is a (deep) copy of an object that had STG on. The
    copied session's loop tracking is bound to the original (by id): apply_stg on the copy replaces it."""
    return session_of(obj) is not None and getattr(obj, OWNER_ATTR, None) != id(obj)


def forget(obj: Any, session: Any) -> None:
    """Drops the record if it is `session`'s (a later session may have replaced it)."""
    if getattr(obj, SESSION_ATTR, None) is session:
        delattr(obj, SESSION_ATTR)
        if OWNER_ATTR in getattr(obj, "__dict__", {}):
            delattr(obj, OWNER_ATTR)
